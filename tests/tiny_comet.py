"""A tiny COMET checkpoint for the tests, and unbabel-comet's own scores of it.

Imported by tests/test_evaluate.py where unbabel-comet is installed; run as a script by a Python that
has it (the pinned stack) when the tests run on the newest stack, which cannot install it:

    python tests/tiny_comet.py build FOLDER '["sentence", ...]'     # tokenizer training texts
    python tests/tiny_comet.py predict FOLDER '{"src": [...], "mt": [...], "ref": [...]}'
"""

import json
import sys
from pathlib import Path


def build_tiny_comet(folder, texts):
    """A 2-layer XLM-R COMET regression model with a locally trained tokenizer, saved as COMET saves one."""
    import pytorch_lightning
    import torch
    import yaml
    from comet.models import RegressionMetric
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    folder = Path(folder)
    encoder = folder / "encoder"
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(texts, vocab_size=200, unk_token="<unk>", show_progress=False,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = XLMRobertaTokenizerFast(tokenizer_object=unigram._tokenizer, bos_token="<s>", eos_token="</s>",
                                        sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                        mask_token="<mask>")
    tokenizer.save_pretrained(encoder)
    XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=258, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(encoder)
    torch.manual_seed(0)
    model = RegressionMetric(pretrained_model=str(encoder), load_pretrained_weights=False, hidden_sizes=[16],
                             local_files_only=True)
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pytorch_lightning.__version__}, folder / "checkpoints" / "model.ckpt")
    (folder / "hparams.yaml").write_text(yaml.safe_dump({**dict(model.hparams), "class_identifier": "regression_metric"}))
    return folder


def predict(folder, batch):
    """unbabel-comet's own segment and system scores (CPU), straight from its API."""
    from comet import load_from_checkpoint

    model = load_from_checkpoint(str(Path(folder) / "checkpoints" / "model.ckpt"), local_files_only=True)
    samples = [{"src": s, "mt": m, "ref": r} for s, m, r in zip(batch["src"], batch["mt"], batch["ref"])]
    prediction = model.predict(samples, batch_size=4, gpus=0, progress_bar=False)
    return {"scores": [float(x) for x in prediction.scores], "system_score": float(prediction.system_score)}


if __name__ == "__main__":
    command, folder, payload = sys.argv[1:4]
    if command == "build":
        build_tiny_comet(folder, json.loads(payload))
        print(json.dumps({"folder": folder}))
    else:
        print(json.dumps(predict(folder, json.loads(payload))))
