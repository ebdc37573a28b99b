"""kd.compat.attention_mask_for: the 4D boolean mask train_kd.py passes on transformers 4.x (where
transformers would build it with torch.vmap, slowly) gives bit-identical logits and gradients, and
is used exactly where it applies."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from kd.compat import attention_mask_for

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def padded_batch(left):
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 11))
    mask = torch.ones(4, 11, dtype=torch.long)
    if left:   # generation-style: the first query rows of a padded row see no real token at all
        mask[1, :5] = 0
        mask[3, :2] = 0
    else:      # train_kd.py's collation
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_same_logits_and_gradients_as_the_2d_mask(tiny_models, left):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], attn_implementation="sdpa")
    ids, mask = padded_batch(left)
    results = []
    for attention_mask in (mask, attention_mask_for(model, mask)):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
        (logits * mask[..., None]).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (logits_2d, grads_2d), (logits_4d, grads_4d) = results
    assert torch.equal(logits_2d, logits_4d)
    assert all(torch.equal(a, b) for a, b in zip(grads_2d, grads_4d))


def test_mask_is_built_only_where_transformers_would_use_vmap(tiny_models):
    ids, mask = padded_batch(left=False)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_models["student"], attn_implementation="sdpa")
    built = attention_mask_for(sdpa, mask)
    if TRANSFORMERS_4:
        # causal & key-is-real: row 1 (7 real tokens) at query 9 sees keys 0..6 only
        assert built.shape == (4, 1, 11, 11) and built.dtype == torch.bool
        assert built[1, 0, 9].tolist() == [True] * 7 + [False] * 4
        assert built[0, 0, 2].tolist() == [True] * 3 + [False] * 8
    else:   # transformers 5 builds it by broadcasting: nothing to gain
        assert built is mask
    no_padding = torch.ones_like(mask)
    assert attention_mask_for(sdpa, no_padding) is no_padding   # transformers uses SDPA's is_causal
    eager = AutoModelForCausalLM.from_pretrained(tiny_models["student"], attn_implementation="eager")
    assert attention_mask_for(eager, mask) is mask              # eager wants an additive float mask
    wrapped = torch.nn.Module()
    wrapped.module = sdpa                                       # DDP / DeepSpeed engines wrap the model
    assert attention_mask_for(wrapped, mask).shape == ((4, 1, 11, 11) if TRANSFORMERS_4 else (4, 11))
