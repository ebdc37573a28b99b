"""Translation metrics of the paper: BLEU and chrF (sacrebleu), COMET (unbabel-comet), paired bootstrap
significance, off-target rate, and similarity to the teacher.

- BLEU / chrF: sacrebleu's metric objects with the target language set, so BLEU picks the tokenizer
  of that language exactly as `sacrebleu -l src-tgt` does (13a; zh for Chinese, ja-mecab for
  Japanese, ko-mecab for Korean); references are passed as one stream; the signature is read after
  scoring.
- Significance: paired bootstrap resampling (Koehn 2004) with sacrebleu.significance.PairedTest for
  BLEU, and the same statistic on COMET's segment scores (bootstrap of the mean), 1000 resamples,
  seed 12345 (sacrebleu's default SACREBLEU_SEED). p < 0.05 is the paper's †. One deviation from
  sacrebleu: when the two systems score exactly the same, p = 1 (sacrebleu returns 1/(n+1) for a
  system compared with itself, because every resample difference is 0 and none exceeds the
  observed 0: an identical system would be "significant").
- COMET: `load_comet` takes a hub name (Unbabel/wmt22-comet-da) or a local checkpoint
  (a model.ckpt file or the folder holding checkpoints/model.ckpt) and fails with a message that
  says what to do when it cannot be loaded (offline, not cached); `comet_scores` runs on one GPU if
  there is one, else on the CPU.
- Off-target rate: py3langid (its model ships inside the package, nothing is downloaded).
"""

import logging
import os
from pathlib import Path

import numpy as np

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 12345


# ---------------------------------------------------------------------------------------------
# BLEU and chrF
# ---------------------------------------------------------------------------------------------

def bleu_metric(tgt_lang):
    """sacrebleu BLEU with the tokenizer of the target language (as `sacrebleu -l xx-tgt`)."""
    from sacrebleu.metrics import BLEU

    return BLEU(trg_lang=tgt_lang)


def corpus_bleu(hypotheses, references, tgt_lang):
    """(score, signature) of corpus BLEU; `references` is one stream, aligned with the hypotheses."""
    metric = bleu_metric(tgt_lang)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, str(metric.get_signature())


def corpus_chrf(hypotheses, references):
    """(score, signature) of corpus chrF (character 6-grams, beta 2: sacrebleu's default chrF2)."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, str(metric.get_signature())


# ---------------------------------------------------------------------------------------------
# Significance: paired bootstrap resampling
# ---------------------------------------------------------------------------------------------

def bleu_paired_bootstrap(baseline_hypotheses, system_hypotheses, references, tgt_lang,
                          n_samples=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED):
    """p-value of the BLEU difference, sacrebleu.significance.PairedTest (test_type "bs")."""
    from sacrebleu.significance import PairedTest

    baseline_hypotheses, system_hypotheses = list(baseline_hypotheses), list(system_hypotheses)
    if corpus_bleu(baseline_hypotheses, references, tgt_lang)[0] == corpus_bleu(system_hypotheses, references, tgt_lang)[0]:
        return 1.0
    logging.getLogger("sacrebleu").setLevel(logging.WARNING)  # no per-test progress lines
    previous = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)  # PairedTest reads its seed from here
    try:
        test = PairedTest([("baseline", baseline_hypotheses), ("system", system_hypotheses)],
                          metrics={"BLEU": bleu_metric(tgt_lang)}, references=[list(references)],
                          test_type="bs", n_samples=n_samples)
        _, scores = test()
    finally:
        if previous is None:
            del os.environ["SACREBLEU_SEED"]
        else:
            os.environ["SACREBLEU_SEED"] = previous
    return float(scores["BLEU"][1].p_value)


def mean_paired_bootstrap(baseline_scores, system_scores, n_samples=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED):
    """p-value of the difference of two mean segment scores (COMET), by paired bootstrap.

    The statistic of sacrebleu's paired bootstrap: resample segment indices with replacement
    (the same indices for both systems), take |mean_system - mean_baseline| per resample, centre
    those differences on their mean, and count how often they exceed the observed difference:
    p = (count + 1) / (n_samples + 1).
    """
    baseline = np.asarray(baseline_scores, dtype=np.float64)
    system = np.asarray(system_scores, dtype=np.float64)
    if baseline.shape != system.shape or baseline.ndim != 1 or len(baseline) == 0:
        raise ValueError(f"paired bootstrap needs two equally long, non-empty score lists "
                         f"(got {baseline.shape} and {system.shape})")
    observed = abs(system.mean() - baseline.mean())
    if observed == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(baseline), size=(n_samples, len(baseline)), replace=True)
    differences = np.abs(system[indices].mean(axis=1) - baseline[indices].mean(axis=1))
    centred = differences - differences.mean()
    return float((np.sum(centred > observed) + 1) / (n_samples + 1))


# ---------------------------------------------------------------------------------------------
# COMET
# ---------------------------------------------------------------------------------------------

def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_comet(name_or_path):
    """A COMET model from a local checkpoint (file, or folder with checkpoints/model.ckpt) or a hub name.

    Raises RuntimeError with what to do when the model cannot be loaded (e.g. offline, not cached).
    """
    from comet import download_model, load_from_checkpoint

    text = str(name_or_path)
    path = Path(text).expanduser()
    offline = hub_offline()
    if path.exists():
        checkpoint = path if path.is_file() else path / "checkpoints" / "model.ckpt"
        if not checkpoint.is_file():
            raise RuntimeError(f"--comet-model {text}: no checkpoints/model.ckpt in this folder; "
                               "pass a COMET model folder (with hparams.yaml and checkpoints/model.ckpt) or its model.ckpt")
    else:
        try:
            checkpoint = Path(download_model(text, local_files_only=offline))
        except Exception as error:  # comet turns every hub failure into KeyError("not supported")
            where = ("the hub cannot be reached (HF_HUB_OFFLINE is set) and it is not in the local cache"
                     if offline else f"it could not be downloaded ({type(error).__name__}: {error})")
            raise RuntimeError(
                f"--comet-model {text}: cannot load this COMET model: {where}. Download it once where the "
                f"hub is reachable (python -c \"from comet import download_model; download_model('{text}')\"), "
                "pass a local checkpoint path, or pass --comet-model none to skip COMET"
            ) from None
    try:
        return load_from_checkpoint(str(checkpoint), local_files_only=offline)
    except Exception as error:
        raise RuntimeError(
            f"--comet-model {text}: cannot load {checkpoint} ({type(error).__name__}: {error}). COMET also loads "
            "the encoder named in its hparams.yaml (xlm-roberta-large for wmt22-comet-da): it must be in the "
            "local Hugging Face cache when offline; or pass --comet-model none to skip COMET"
        ) from None


def comet_scores(model, sources, hypotheses, references, batch_size=32):
    """(segment scores, system score) of COMET on one GPU if there is one, else on the CPU (0..1 scale)."""
    import torch

    samples = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
    gpus = 1 if torch.cuda.is_available() else 0
    prediction = model.predict(samples, batch_size=batch_size, gpus=gpus, progress_bar=False)
    return [float(score) for score in prediction.scores], float(prediction.system_score)


# ---------------------------------------------------------------------------------------------
# Off-target rate
# ---------------------------------------------------------------------------------------------

def language_identifier():
    """py3langid's identifier (97 languages, model shipped in the package)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)


def off_target_rate(hypotheses, tgt_lang, identifier=None):
    """Share of hypotheses whose identified language is not `tgt_lang` (empty ones count as off-target).

    None when py3langid does not know the target language.
    """
    identifier = identifier or language_identifier()
    if tgt_lang not in identifier.nb_classes:
        return None
    hypotheses = list(hypotheses)
    if not hypotheses:
        raise ValueError("off_target_rate of no hypotheses")
    off = sum(1 for text in hypotheses if not text.strip() or identifier.classify(text)[0] != tgt_lang)
    return off / len(hypotheses)
