"""Low-rank adapters (LoRA) for encoder weights: training-time wrappers and the load-time merge.

A trained adapter is a set of pairs (A, B) per Linear layer; the adapted weight is
W + (alpha / rank) · B @ A. At load it is merged into a copy of the weights (no cost per text);
for training, `wrap` replaces the targeted Linear layers with `LoRALinear` modules whose base
weights are frozen. Adapters are stored as safetensors (`<layer name>.lora_A`, `.lora_B`), with
rank, alpha and targets in the head's JSON. This module owns only that arithmetic; which model
gets an adapter is the sentiment runner's business (workers/runners/sentiment.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "intermediate.dense", "output.dense")
"""Linear layers adapted in each BERT-style encoder layer (names relative to `encoder.layer.N`)."""


def target_names(model: Any, targets: Iterable[str] = TARGETS) -> list[str]:
    """Qualified names of the Linear layers to adapt: `encoder.layer.N.<target>` for every N."""
    import torch

    wanted = set(targets)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layer." in name:
            within = name.split(".layer.", 1)[1].split(".", 1)  # ["N", "<target>"]
            if len(within) == 2 and within[1] in wanted:
                names.append(name)
    return names


def wrap(model: Any, rank: int, alpha: float, dropout: float, targets: Iterable[str] = TARGETS) -> list[str]:
    """Replace the targeted Linear layers of `model` by LoRA wrappers (in place); returns their names."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base = base
            self.scale = alpha / rank
            self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features))
            self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
            torch.nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
            self.drop = torch.nn.Dropout(dropout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (self.drop(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    for p in model.parameters():
        p.requires_grad_(False)
    names = target_names(model, targets)
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child)))
    return names


def adapter_state(model: Any, names: list[str]) -> dict[str, Any]:
    """The trained (A, B) pairs of a wrapped model, as a flat dict for safetensors."""
    out = {}
    for name in names:
        module = model.get_submodule(name)
        out[name + ".lora_A"] = module.lora_A.detach().contiguous()
        out[name + ".lora_B"] = module.lora_B.detach().contiguous()
    return out


def merge(model: Any, path: Path, rank: int, alpha: float) -> int:
    """Add an adapter file's B @ A · alpha/rank to `model`'s float weights in place; returns layers merged.

    The model must be unquantized (quantize after merging). A layer named in the file but absent
    from the model is an error: the adapter was trained for another architecture.
    """
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    scale = alpha / rank
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)  # AttributeError if the architecture differs
            delta = state[name + ".lora_B"].float() @ state[name + ".lora_A"].float()
            if delta.shape != layer.weight.shape:
                raise ValueError(f"adapter layer {name}: shape {tuple(delta.shape)} is not the model's "
                                 f"{tuple(layer.weight.shape)}")
            layer.weight += (delta * scale).to(layer.weight.dtype)
    return len(names)
