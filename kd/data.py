"""Reading the prepared JSONL files, tokenising prompt + reference, and collating batches.

One example = the prompt (kd/prompts.py, ends with the response marker) followed by the reference
translation and EOS. The prompt and the response are tokenised separately and concatenated, so the
boundary between them is exact and generation sees the same prompt ids the model was trained on.

    labels = [-100] * len(prompt_ids) + response_ids + [eos]     (the loss counts the response only)

Examples longer than `max_length` are dropped and counted, never cut: cutting the prompt would
remove the source the reference translates, and cutting the response would teach the model to stop
mid-sentence. The trainer logs how many were dropped (0.03 % of ALMA at 512 tokens).

Padding: right padding for training (labels -100 on padding), left padding for generation (so the
last position of every row is the last prompt token).
"""

import random

import torch
import torch.nn.functional as F

from kd.io import read_jsonl

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("id", "direction", "prompt", "reference")  # of a training/validation row (kd.io.read_jsonl)


def read_rows(path, argument):
    """Rows of a prepared train/valid JSONL file; any problem stops the run naming the argument (and file:line)."""
    return read_jsonl(path, required=REQUIRED_FIELDS, text_fields=("prompt", "reference"), allow_empty=False,
                      argument=argument)


def shifted_targets(labels):
    """targets[b, i] = labels[b, i + 1]: the token that position i predicts (IGNORE_INDEX where nothing counts).
    The labels are shifted, not the logits, so the logits stay one contiguous tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def encode_prompt(tokenizer, prompt):
    """Prompt token ids, with the BOS token when the tokenizer adds one (as Llama's does)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_example(tokenizer, prompt, reference, max_length):
    """input_ids and labels of one training example, or None when it is longer than max_length."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        return None
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


class TranslationDataset(torch.utils.data.Dataset):
    """Tokenised training examples of a prepared JSONL file.

    `directions` lists the translation directions in a fixed order; each example carries the index
    of its direction so the trainer can report statistics per direction.
    """

    def __init__(self, rows, tokenizer, max_length, source_name="<rows>"):
        self.directions = sorted({row["direction"] for row in rows})
        direction_index = {direction: i for i, direction in enumerate(self.directions)}
        self.examples = []
        self.dropped_too_long = 0
        for row in rows:
            encoded = encode_example(tokenizer, row["prompt"], row["reference"], max_length)
            if encoded is None:
                self.dropped_too_long += 1
                continue
            encoded["direction"] = direction_index[row["direction"]]
            encoded["index"] = len(self.examples)  # where a stored teacher (kd/teacher_cache.py) finds it
            self.examples.append(encoded)
        if not self.examples:
            raise ValueError(
                f"{source_name}: no example fits in max_length={max_length} tokens "
                f"({len(rows)} rows read); raise --max-length or check the file"
            )

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def lengths(self):
        return [len(example["input_ids"]) for example in self.examples]


class TrainCollator:
    """Right-pads a list of examples into input_ids, attention_mask, labels, direction and index tensors
    (index: the example's place in its TranslationDataset, -1 for examples without one)."""

    def __init__(self, pad_token_id, pad_to_multiple_of=None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples):
        width = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[i, :n] = torch.tensor(example["input_ids"])
            labels[i, :n] = torch.tensor(example["labels"])
            attention_mask[i, :n] = 1
        direction = torch.tensor([example.get("direction", 0) for example in examples], dtype=torch.long)
        index = torch.tensor([example.get("index", -1) for example in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "direction": direction,
                "index": index}


def left_pad(sequences, pad_token_id):
    """Left-pads token id lists for generation: (input_ids, attention_mask)."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        if sequence:
            input_ids[i, width - len(sequence):] = torch.tensor(sequence)
            attention_mask[i, width - len(sequence):] = 1
    return input_ids, attention_mask


def length_grouped_order(lengths, batch_size, seed):
    """A shuffled order in which each run of `batch_size` indices has similar lengths.

    Shuffle, cut into mega-batches of 50 batches, sort each by length, then shuffle the batches:
    padding shrinks while the order stays random across the epoch.
    """
    generator = random.Random(seed)
    order = list(range(len(lengths)))
    generator.shuffle(order)
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda index: -lengths[index])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    generator.shuffle(batches)
    return [index for batch in batches for index in batch]
