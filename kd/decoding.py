"""Translating prompts with a causal LM: the decoding engine of generate.py and of train_kd.py's
validation by a translation metric (--best-metric bleu|chrf).

Rows are sorted by prompt length (longest first) and cut into batches; each batch is left-padded
(the last position of every row is its last prompt token; transformers derives position ids from
the attention mask) and decoded greedily (the paper's beam 1) or with beam search, with the KV
cache, until every row has produced EOS or max_new_tokens. With several processes the batches of a
round are dealt to them; under DeepSpeed ZeRO-3 a process without a batch decodes a dummy row
(synced_gpus) so that the sharded parameters are gathered in step. With fp32 weights a row's tokens
do not depend on its batch (tests/test_generate.py checks batched == one at a time).

The hypothesis of a response is its first non-blank line, stripped: a base model that does not stop
goes on with a new "### ..." block, which is not the translation.
"""

from __future__ import annotations

import torch

from kd.data import left_pad


def first_line(raw):
    """The hypothesis: the first non-blank line of the response, stripped."""
    text = raw.lstrip()
    return text.split("\n", 1)[0].strip()


def cut_at_eos(tokens, eos_token_id):
    return tokens[:tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


class HFGenerator:
    """transformers generate on left-padded batches with the KV cache: token id lists in, response
    token id lists out (EOS and what follows removed)."""

    def __init__(self, model, tokenizer, max_new_tokens, num_beams=1, synced_gpus=False):
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.synced_gpus = model, tokenizer, synced_gpus
        # A fresh config: the checkpoint's own (Llama-2 ships do_sample=True, temperature 0.6) must not apply.
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, use_cache=True,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )

    @torch.no_grad()
    def __call__(self, id_lists):
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad(id_lists, self.tokenizer.pad_token_id)
        output = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            generation_config=self.config, synced_gpus=self.synced_gpus,
        )
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return [cut_at_eos(tokens, self.tokenizer.eos_token_id) for tokens in new_tokens]


def length_sorted_batches(id_lists, batch_size):
    """Indices of `id_lists` cut into batches of similar length, longest first."""
    order = sorted(range(len(id_lists)), key=lambda i: (-len(id_lists[i]), i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def decode_rounds(generator, id_lists, batch_size, process_index=0, num_processes=1, synced_gpus=False):
    """Yields, round by round, this process's share of the batches as [(index into id_lists, response
    tokens)]: the batches of a round are dealt to the processes, one each. Every process runs the
    same number of rounds; under synced_gpus one without a batch decodes a dummy row (dropped)."""
    batches = length_sorted_batches(id_lists, batch_size)
    for first in range(0, len(batches), num_processes):
        round_batches = batches[first:first + num_processes]
        mine = round_batches[process_index] if process_index < len(round_batches) else []
        if mine:
            yield list(zip(mine, generator([id_lists[i] for i in mine])))
        else:
            if synced_gpus:
                generator([id_lists[batches[0][0]]])  # keep the sharded forward passes in step
            yield []
