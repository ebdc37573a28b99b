"""What differs between the two supported stacks, and the noise of CPU runs, in one place.

The stacks: requirements.txt (transformers 4.57, numpy 1.26, unbabel-comet) and requirements-latest.txt
(transformers 5, numpy 2, no unbabel-comet; COMET through evaluate.py --comet-python).
"""

import os

import torch


def quiet_cpu_runs():
    """Name DeepSpeed's CPU accelerator on a machine without a GPU (DS_ACCELERATOR=cpu) instead of
    letting it guess: its guess logs "Setting accelerator to CPU. If you have GPU ..., we were unable
    to detect it" on every import. Child processes (accelerate launch) inherit the setting; a value
    the user set is kept."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed_kwargs_handlers(deepspeed):
    """Accelerator(kwargs_handlers=...) for a DeepSpeed run on a machine without CUDA: accelerate finds no
    device, picks no process-group backend and every rank then reports one process and index 0 (both
    ranks act as the main process and read the same data) while DeepSpeed starts a world of N on gloo;
    naming gloo makes the ranks see each other. GPU runs (NCCL) are left as they are."""
    if not deepspeed or torch.cuda.is_available():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


# transformers 4.x builds the 4D attention mask of every forward pass with torch.vmap when a batch
# has padding: about 13 ms a call on a CPU, a third of a tiny model's training step (profile of the
# study's 3x96 student). transformers 5 builds the same mask by broadcasting. The mask is only
# causal & key-is-not-padding, so we build that boolean mask ourselves on 4.x; transformers passes a
# 4D mask through unchanged and SDPA gets the very same tensor, so outputs are bit-identical.
def _builds_mask_with_vmap():
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


_VMAP_MASKS = _builds_mask_with_vmap()


def attention_mask_for(model, attention_mask):
    """The attention mask to pass to a decoder's forward over a full (no-cache) right- or left-padded
    batch: on transformers 4.x with SDPA attention and padding present, the [B, 1, T, T] boolean mask
    transformers would build (True: attend); otherwise the 2D mask as it is (no padding: transformers
    skips the mask and uses SDPA's is_causal; eager and flash attention build their own)."""
    config = getattr(getattr(model, "module", model), "config", None)
    if not _VMAP_MASKS or getattr(config, "_attn_implementation", None) != "sdpa" or bool(attention_mask.all()):
        return attention_mask
    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]
