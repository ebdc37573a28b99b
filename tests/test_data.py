"""kd/prompts.py, kd/data.py and kd/models.py: templates, masking, padding, tiny models."""


import pytest
import torch

from kd.data import (
    IGNORE_INDEX,
    TrainCollator,
    TranslationDataset,
    encode_example,
    encode_prompt,
    left_pad,
    length_grouped_order,
)
from kd.models import check_model_path, load_model, load_tokenizer, tokenizer_mismatch
from kd.prompts import build_prompt, language_name


# ---- prompts ----

def test_alpaca_prompt_is_the_papers_text():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n"
        "\n"
        "### Instruction:\n"
        "Translate the following sentences from Czech to English.\n"
        "\n"
        "### Input:\n"
        "Dobrý den.\n"
        "\n"
        "### Response:\n"
    )
    assert build_prompt("Dobrý den.", "cs", "en") == expected


def test_alma_prompt():
    assert build_prompt("Hallo.", "en", "de", "alma") == "Translate this from English to German:\nEnglish: Hallo.\nGerman:"


def test_unknown_language_lists_known_codes():
    with pytest.raises(ValueError, match=r"unknown language code 'xx'.*cs, de, en"):
        language_name("xx")
    for code in ("cs", "de", "en", "fr", "ha", "is", "ja", "ru", "uk", "zh"):
        assert language_name(code)


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template"):
        build_prompt("a", "de", "en", "chatml")


# ---- tokenisation and masking ----

def test_labels_mask_exactly_the_prompt_and_end_with_eos(tiny_models):
    tokenizer = load_tokenizer(tiny_models["student"])
    prompt = build_prompt("Der Hund sieht die Katze.", "de", "en")
    encoded = encode_example(tokenizer, prompt, "The dog sees the cat.", max_length=512)
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = tokenizer("The dog sees the cat.", add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert encoded["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(encoded["input_ids"][len(prompt_ids):], skip_special_tokens=True) == "The dog sees the cat."


def test_too_long_examples_are_dropped_and_counted(tiny_models):
    tokenizer = load_tokenizer(tiny_models["student"])
    prompt = build_prompt("kurz", "de", "en")
    rows = [
        {"id": "a", "direction": "de-en", "prompt": prompt, "reference": "short"},
        {"id": "b", "direction": "en-de", "prompt": prompt, "reference": "long " * 200},
    ]
    limit = len(encode_example(tokenizer, prompt, "short", 10_000)["input_ids"])
    dataset = TranslationDataset(rows, tokenizer, max_length=limit)
    assert len(dataset) == 1 and dataset.dropped_too_long == 1
    assert dataset.directions == ["de-en", "en-de"]
    assert dataset[0]["direction"] == 0
    with pytest.raises(ValueError, match="no example fits"):
        TranslationDataset(rows, tokenizer, max_length=3, source_name="x.jsonl")


def test_collator_pads_right_with_ignored_labels():
    examples = [
        {"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2], "direction": 1},
        {"input_ids": [1, 7], "labels": [-100, 2], "direction": 0},
    ]
    batch = TrainCollator(pad_token_id=3)(examples)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 3, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2], [-100, 2, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["direction"].tolist() == [1, 0]
    padded = TrainCollator(pad_token_id=3, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape == (2, 8) and padded["labels"][:, 4:].eq(-100).all()


def test_left_pad_for_generation():
    input_ids, mask = left_pad([[1, 5, 6], [1, 7]], pad_token_id=0)
    assert input_ids.tolist() == [[1, 5, 6], [0, 1, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_length_grouped_order_is_a_seeded_permutation_with_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(1000)]
    order = length_grouped_order(lengths, batch_size=10, seed=3)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=10, seed=3)
    assert order != length_grouped_order(lengths, batch_size=10, seed=4)
    spread = [max(lengths[i] for i in order[k:k + 10]) - min(lengths[i] for i in order[k:k + 10]) for k in range(0, 1000, 10)]
    assert sum(spread) / len(spread) < 10  # a random order spreads ~80 within a batch


# ---- tiny models ----

def test_tiny_models_load_with_auto_classes_and_generate(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    assert teacher.config.model_type == student.config.model_type == "llama"
    assert teacher.num_parameters() > 2 * student.num_parameters()
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    prompt = encode_prompt(tokenizer, build_prompt("Der Hund.", "de", "en"))
    output = student.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > len(prompt)
    assert tokenizer_mismatch(load_tokenizer(tiny_models["student"]), load_tokenizer(tiny_models["teacher"])) is None


def test_tiny_models_are_seeded(demo_data, tiny_models, tmp_path):
    import make_tiny_models
    from tests.conftest import TINY_STUDENT, TINY_TEACHER

    again = make_tiny_models.main(["--data", str(demo_data), "--out", str(tmp_path), "--vocab-size", "600", *TINY_TEACHER, *TINY_STUDENT])
    first, second = load_model(tiny_models["student"]), load_model(again["student"])
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_tokenizer_mismatch_is_reported(tiny_models, tmp_path):
    from kd.models import train_tokenizer

    other = train_tokenizer(["completely different words here"] * 10, vocab_size=300)
    assert "differ" in tokenizer_mismatch(load_tokenizer(tiny_models["student"]), other)


def test_missing_model_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--teacher ./nope: no such folder"):
        check_model_path("./nope", "--teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model_path(tmp_path / "empty", "--student")
    check_model_path("meta-llama/Llama-2-7b-hf", "--student")  # a hub id passes (loaded later, online)


def test_missing_pad_token_falls_back_with_a_warning(tiny_models, tmp_path):
    tokenizer = load_tokenizer(tiny_models["student"])
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no pad token"):
        reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == "<unk>"
