"""LoRA students (`train_kd.py --lora-r R`, peft): low-rank adapters trained, the base weights frozen.

The student's linear layers (`--lora-target-modules`, default every linear layer but the lm_head:
peft's "all-linear") get W' = W + (α/r)·B·A with A [r, in] and B [out, r] (B starts at 0, so the
student starts as the base model); only A and B are trained, so the optimizer holds 2 AdamW moments
for them alone. The teacher runs as for full fine-tuning. With --bf16 the frozen base weights are
loaded in bf16 (they need no fp32 master copy); the adapters stay fp32 (peft's default).

Saving: final/ and best/ hold the MERGED model (W + (α/r)·B·A written into the base weights, peft's
wrappers removed: a plain checkpoint that AutoModelForCausalLM.from_pretrained loads and generate.py
uses) and, in final/adapter/ and best/adapter/, the adapter alone (peft's save_pretrained:
adapter_config.json + adapter_model.safetensors, loadable with PeftModel.from_pretrained on the base
model). The merge is done here from the gathered state dict (also under ZeRO-3, where the weights
are partitioned), so it never changes the model being trained. The step_/epoch_ checkpoints are
accelerate's save_state of the whole student (base + adapters) and the optimizer state (adapters only).
"""

from __future__ import annotations

ALPHA_PER_RANK = 2.0  # --lora-alpha default: α = 2r
PREFIX = "base_model.model."


def target_problem(module_names, target_modules):
    """Why target_modules cannot be the adapters' targets in a model with these module names, or None.
    A name matches a module whose dotted name ends with it (as peft matches). The lm_head is refused:
    train_kd.py computes the loss from the lm_head weight itself (kd/losses.py, the memory-lean path),
    so an adapter on it would never be trained."""
    if target_modules == ["all-linear"]:
        return None
    leaves = {name.rsplit(".", 1)[-1] for name in module_names if name}
    if "lm_head" in target_modules:
        return ("the lm_head cannot have an adapter here: the loss reads its weight directly (the memory-lean "
                "path of kd/losses.py), so the adapter would never train")
    unknown = [name for name in target_modules
               if not any(module == name or module.endswith("." + name) for module in module_names)]
    if unknown:
        return (f"no module of the student is called {', '.join(unknown)} (its module names end in: "
                f"{', '.join(sorted(leaves))[:300]})")
    return None


def add_adapters(model, r, alpha, dropout, target_modules):
    """The peft model with LoRA adapters of rank r on target_modules (a list of names, or ["all-linear"])."""
    from peft import LoraConfig, get_peft_model

    problem = target_problem([name for name, _ in model.named_modules()], list(target_modules))
    if problem:
        raise ValueError(problem)
    targets = target_modules[0] if target_modules == ["all-linear"] else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merged_state_dict(state_dict, scaling):
    """The base model's state dict with every adapter merged: W + scaling·B·A (in float32, then W's dtype)."""
    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".base_layer." in name:
            module = key[:key.index(".base_layer.")]
            name = name.replace(".base_layer.", ".")
            lora_a, lora_b = state_dict.get(f"{module}.lora_A.default.weight"), state_dict.get(f"{module}.lora_B.default.weight")
            if name.endswith(".weight") and lora_a is not None:
                value = (value.float() + scaling * (lora_b.float() @ lora_a.float())).to(value.dtype)
        merged[name] = value
    return merged


def trainable_parameters(model):
    """(trainable, total) parameter counts; under DeepSpeed ZeRO-3 a loaded parameter is partitioned
    (numel 0 on each rank) and its full size is ds_numel."""
    def size(p):
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(size(p) for p in model.parameters())
