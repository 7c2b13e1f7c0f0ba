"""The model cache: loads a registry entry's weights once per worker process, on its device.

Loading happens in the worker process itself (the worker uses a thread pool, so there is no
fork after it); a second request for the same model returns the loaded one.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from llmos.errors import ConfigError
from llmos.registry import ModelSpec, resolve_source

_cache: dict[tuple[str, str], "LoadedModel"] = {}
_lock = threading.Lock()

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: tokenizer, torch module, device."""

    spec: ModelSpec
    tokenizer: Any
    model: Any
    device: Any  # torch.device
    source: str


def get(spec: ModelSpec, device: str) -> LoadedModel:
    key = (spec.name, device)
    with _lock:
        if key not in _cache:
            _cache[key] = load(spec, device)
        return _cache[key]


def load(spec: ModelSpec, device: str) -> LoadedModel:
    """Load tokenizer and encoder weights from a local folder or (online) the hub."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = resolve_source(spec)
    dtype = getattr(torch, DTYPES[spec.dtype])
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision)
        model = AutoModel.from_pretrained(source, revision=spec.revision, dtype=dtype)
    except OSError as exc:
        raise ConfigError(
            f"cannot load model {spec.name!r} from {source!r}: {str(exc).splitlines()[0]}. "
            "Offline, point `source` at a local folder."
        ) from None
    torch_device = torch.device(device)
    model.to(torch_device)
    model.eval()
    return LoadedModel(spec=spec, tokenizer=tokenizer, model=model, device=torch_device, source=source)
