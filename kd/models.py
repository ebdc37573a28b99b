"""Loading models and tokenizers, and building the tiny local models used by tests and the quickstart.

Every script loads models through `load_tokenizer` / `load_model`, with a hub name
(`meta-llama/Llama-2-7b-hf`) or a local folder saved by `save_pretrained` alike. The tiny models
(`build_tiny_models`, CLI: make_tiny_models.py) are real Llama-architecture checkpoints with a BPE
tokenizer trained locally, so the whole pipeline runs offline exactly as it runs on Llama.
"""

import json
import warnings
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def check_model_path(name_or_path, argument="--model"):
    """Fail now, naming the argument, when a model path cannot be loaded (not deep inside transformers).

    An existing folder must hold a config.json; anything else must look like a hub id ("org/name").
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{argument} {text}: no config.json there; pass a save_pretrained folder")
        return
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"{argument} {text}: no such folder (train or download the model first)")


def load_tokenizer(name_or_path, padding_side="right"):
    """The tokenizer, with a pad token (eos or unk, with a warning) when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ValueError(f"{name_or_path}: tokenizer has neither pad, unk nor eos token")
        warnings.warn(f"{name_or_path}: tokenizer has no pad token; using {fallback!r} for padding")
        tokenizer.pad_token = fallback
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name_or_path}: tokenizer has no eos token; responses could never end")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name_or_path, dtype="fp32"):
    """A causal LM in the given precision ("fp32", "bf16" or "fp16")."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])


def tokenizer_mismatch(student_tokenizer, teacher_tokenizer):
    """Why two tokenizers cannot share a distillation loss, or None when they agree.

    They must map the same strings to the same ids (vocabularies equal up to trailing padding rows)
    and use the same special tokens for the prompt and the end of the response.
    """
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(student_tokenizer, name) != getattr(teacher_tokenizer, name):
            return (
                f"{name} differs (student {getattr(student_tokenizer, name)}, "
                f"teacher {getattr(teacher_tokenizer, name)})"
            )
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    common = set(student_vocab) & set(teacher_vocab)
    if any(student_vocab[token] != teacher_vocab[token] for token in common):
        return "the same token has different ids in the two vocabularies"
    smaller = min(len(student_vocab), len(teacher_vocab))
    if len(common) < smaller:
        return f"vocabularies differ beyond padding ({len(student_vocab)} vs {len(teacher_vocab)} tokens, {len(common)} shared)"
    return None


# ---------------------------------------------------------------------------------------------
# Tiny local models
# ---------------------------------------------------------------------------------------------

def training_texts(train_file, limit=20000):
    """Sources, references and prompts of a prepared train.jsonl, for training the tokenizer."""
    texts = []
    with open(train_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line_number > limit:
                break
            row = json.loads(line)
            texts.extend([row["prompt"], row["reference"]])
    if not texts:
        raise ValueError(f"{train_file}: empty; run prepare_data.py first")
    return texts


def train_tokenizer(texts, vocab_size):
    """A byte-level BPE tokenizer with <s>, </s>, <unk>, <pad>, adding <s> in front like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def tiny_llama(tokenizer, layers, hidden, heads, seed, max_positions=1024):
    """A randomly initialised Llama of the given size, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32 or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tiny_models(train_file, out_dir, vocab_size=2000, seed=0,
                      teacher_size=(4, 256, 4), student_size=(2, 128, 2)):
    """Train a tokenizer on `train_file`, build a teacher and a student, save both to out_dir/{teacher,student}.

    Sizes are (layers, hidden, heads). Returns the two folders.
    """
    tokenizer = train_tokenizer(training_texts(train_file), vocab_size)
    folders = {}
    for offset, (role, (layers, hidden, heads)) in enumerate((("teacher", teacher_size), ("student", student_size))):
        model = tiny_llama(tokenizer, layers, hidden, heads, seed=seed + offset)
        folder = Path(out_dir) / role
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[role] = folder
    return folders
