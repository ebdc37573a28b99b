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
  `comet_scores_in(python, ...)` does the same through another environment's Python (one that
  has unbabel-comet, e.g. the pinned stack of requirements.txt), running this file as a script and
  reading the scores back: the newest stack (requirements-latest.txt) cannot install unbabel-comet.
- Off-target rate: py3langid (its model ships inside the package, nothing is downloaded), its guess
  restricted to CANDIDATE_LANGUAGES plus the languages of the scored directions: among all its 97
  languages it takes 5.6 % of the WMT22 Russian references for Bulgarian, Ukrainian or Macedonian
  and 3 % of the Czech ones for Slovak. Japanese is written with kana: a text without any is not
  taken for Japanese (kanji-only Chinese would be, 1.3 % of the WMT22 Chinese references). With
  it, ALMA's WMT22 references are off-target at most 0.55 % (cs 0.34, de 0.55, is 0.10, ru 0.02,
  zh 0.03, en 0.39 %).
"""

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
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


def check_bleu_tokenizer(tgt_lang):
    """Raise RuntimeError saying what to install when sacrebleu cannot tokenize `tgt_lang` text
    (ja-mecab needs sacrebleu[ja], ko-mecab sacrebleu[ko]); call it before scoring anything."""
    try:
        metric = bleu_metric(tgt_lang)
        metric.corpus_score(["a"], [["a"]])
    except (RuntimeError, ImportError, AssertionError) as error:
        raise RuntimeError(f"sacrebleu cannot tokenize {tgt_lang} text: {' '.join(str(error).split())}") from None


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


def comet_scores_in(python, model_name, jobs, batch_size=32):
    """COMET through another environment's Python: {key: (segment scores, system score)} of
    jobs = {key: (sources, hypotheses, references)}, one model load for all of them.

    Runs `python kd/metrics.py` (this file) there; raises RuntimeError with that process's message
    when it cannot load the model or score.
    """
    with tempfile.TemporaryDirectory(prefix="comet-") as folder:
        request, answer = Path(folder) / "request.json", Path(folder) / "scores.json"
        request.write_text(json.dumps({
            "model": str(model_name), "batch_size": batch_size,
            "jobs": {key: {"src": list(s), "mt": list(h), "ref": list(r)} for key, (s, h, r) in jobs.items()},
        }, ensure_ascii=False), encoding="utf-8")
        try:
            done = subprocess.run([str(python), str(Path(__file__).resolve()), str(request), str(answer)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as error:
            raise RuntimeError(f"--comet-python {python}: cannot run it ({error.strerror})") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise RuntimeError(f"--comet-python {python}: COMET failed there: "
                               f"{lines[-1] if lines else f'exit code {done.returncode}'}")
        scores = json.loads(answer.read_text(encoding="utf-8"))
    return {key: (value["scores"], value["system_score"]) for key, value in scores.items()}


def _comet_worker(request_path, answer_path):
    """The other end of comet_scores_in, run by the Python that has unbabel-comet."""
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    try:
        model = load_comet(request["model"])
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    answer = {}
    for key, job in request["jobs"].items():
        segments, system = comet_scores(model, job["src"], job["mt"], job["ref"], request["batch_size"])
        answer[key] = {"scores": segments, "system_score": system}
    Path(answer_path).write_text(json.dumps(answer), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Off-target rate
# ---------------------------------------------------------------------------------------------

# ALMA's languages and English: the guess is restricted to these and the scored directions' languages
CANDIDATE_LANGUAGES = ("cs", "de", "en", "is", "ja", "ru", "zh")
KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")  # hiragana, katakana (also half-width)


class LanguageGuesser:
    """py3langid restricted to a candidate set, with the kana rule for Japanese."""

    def __init__(self, languages=()):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        if hasattr(LanguageIdentifier, "from_model_file"):  # py3langid 0.4 (numpy 2): its model file format
            self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        else:  # py3langid 0.2.x / 0.3.x: the pickled model
            self.identifier = LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)
        known = set(self.identifier.nb_classes)
        self.languages = sorted({*CANDIDATE_LANGUAGES, *languages} & known)
        self.identifier.set_languages(self.languages)

    def knows(self, lang):
        return lang in self.languages

    def classify(self, text):
        ranked = self.identifier.rank(text)
        best = ranked[0][0]
        if best == "ja" and not KANA.search(text) and len(ranked) > 1:
            best = next(lang for lang, _ in ranked if lang != "ja")
        return best


def language_identifier(languages=()):
    """The language guesser for CANDIDATE_LANGUAGES plus `languages` (those py3langid knows)."""
    return LanguageGuesser(languages)


def off_target_rate(hypotheses, tgt_lang, identifier=None):
    """Share of hypotheses whose identified language is not `tgt_lang` (empty ones count as off-target).

    None when py3langid does not know the target language.
    """
    identifier = identifier or language_identifier([tgt_lang])
    if not identifier.knows(tgt_lang):
        return None
    hypotheses = list(hypotheses)
    if not hypotheses:
        raise ValueError("off_target_rate of no hypotheses")
    off = sum(1 for text in hypotheses if not text.strip() or identifier.classify(text) != tgt_lang)
    return off / len(hypotheses)


if __name__ == "__main__":  # the COMET worker of comet_scores_in: python kd/metrics.py REQUEST ANSWER
    here = Path(__file__).resolve().parent  # kd/ itself must not shadow top-level modules (data, models)
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    _comet_worker(*sys.argv[1:3])
