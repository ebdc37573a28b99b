"""On-policy distillation (`train_kd.py --on-policy-ratio R`): micro-batches of the student's own responses.

As in GKD (Agarwal et al., 2024) and DistiLLM: for a share R of the micro-batches the student first
samples a response to each prompt (no gradient through the sampling), the teacher scores those
tokens in the usual teacher forward pass, and the loss is computed on them. This removes the
train/inference mismatch of learning only on reference prefixes.

  * Which micro-batches: micro-batch i of optimizer step s is on-policy when a uniform number drawn
    from (seed, s, i) is below R, the same decision on every process (ZeRO-3's collective
    generation needs every process to generate together), independent of the run's RNG state, so a
    resumed run makes the same choices.
  * Sampling: the student in eval mode, plain ancestral sampling from softmax(z / T)
    (--on-policy-temperature T, no top-k/top-p), up to --on-policy-max-new-tokens tokens (capped so
    that prompt + response fit --max-length) or its EOS, included as the last label as in the
    training data. The random stream is seeded from (seed, s, i, process) inside a forked RNG: the
    same samples after a resume, and the training RNG is not advanced. Under DeepSpeed ZeRO-3 with
    synced_gpus=True as generate.py does.
  * Loss on a sampled response: the divergence alone, with weight 1 (λ = 1: a cross-entropy term on
    the student's own sample would teach it to repeat itself), for the methods whose registry entry
    says on_policy=True (kd/methods.py: forward KL(p‖q), reverse KL(q‖p), ...). The methods built on
    the reference (ỹ = (1−α)y + αp mixes in the reference token y: noevo, skew, selfevo, ...) are
    refused: a sampled token is not a reference, and taking it as y would pull the student toward
    its own sample.
  * Exact token weighting: the responses of a step are sampled before any of its forward passes, so
    its token count (the divisor of every micro-batch's summed loss) counts the sampled tokens.
"""

from __future__ import annotations

import random
import zlib

import torch

from kd.data import IGNORE_INDEX, TrainCollator, left_pad


def is_on_policy(seed: int, step: int, index: int, ratio: float) -> bool:
    """Whether micro-batch `index` of optimizer step `step` (0-based) is on-policy: the same on every process."""
    if ratio <= 0.0:
        return False
    return random.Random(f"on-policy {seed} {step} {index}").random() < ratio


def sampling_seed(seed: int, step: int, index: int, process: int) -> int:
    return zlib.crc32(f"sample {seed} {step} {index} {process}".encode())


def prompt_lengths(labels: torch.Tensor) -> list:
    """Per row, the number of prompt tokens: the position of the first counted label."""
    return (labels != IGNORE_INDEX).int().argmax(1).tolist()


@torch.no_grad()
def sample_micro_batch(model, batch, *, pad_token_id, eos_token_id, max_new_tokens, max_length, temperature,
                       seed, synced_gpus=False):
    """The micro-batch with each reference replaced by a response sampled from `model` (the unwrapped
    student). Returns a new batch (input_ids, attention_mask, labels, direction) on the batch's device."""
    device = batch["input_ids"].device
    prompts = [batch["input_ids"][row, :length].tolist() for row, length in enumerate(prompt_lengths(batch["labels"]))]
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    new_tokens = max(1, min(max_new_tokens, max_length - input_ids.shape[1]))
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_beams=1,
                                max_new_tokens=new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                use_cache=True, synced_gpus=synced_gpus)
    model.train(was_training)
    examples = []
    for row, tokens in enumerate(output[:, input_ids.shape[1]:].tolist()):
        if eos_token_id in tokens:  # keep the EOS: the student learns where to stop, as on references
            tokens = tokens[:tokens.index(eos_token_id) + 1]
        examples.append({"input_ids": prompts[row] + tokens, "labels": [IGNORE_INDEX] * len(prompts[row]) + tokens,
                         "direction": int(batch["direction"][row])})
    return {key: value.to(device) for key, value in TrainCollator(pad_token_id)(examples).items()}
