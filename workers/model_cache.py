"""The model cache: loads a registry entry's weights once per worker process, on its device.

The entry's `kind` picks the Auto class (never a pipeline: transformers 5 dropped several, and
a pipeline silently loads a random head onto the wrong architecture). Loading happens in the
worker process itself (a thread pool, so no fork after it); a second request for the same model
returns the loaded one. The `openai` engine has no weights: its "model" is an HTTP client.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable

from llmos.errors import ConfigError
from llmos.registry import ModelSpec, resolve_source

_cache: dict[tuple[str, str], "LoadedModel"] = {}
_lock = threading.Lock()

AUTO_CLASSES = {
    "encoder": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classifier": "AutoModelForSequenceClassification",
    "qa": "AutoModelForQuestionAnswering",
}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: tokenizer, torch module (or HTTP client), device."""

    spec: ModelSpec
    tokenizer: Any
    model: Any
    device: Any  # torch.device, or None for the openai engine
    source: str

    @property
    def context_window(self) -> int:
        """Tokens the model can attend to (input window for encoders, prompt + output for decoders)."""
        if self.spec.max_input_tokens:
            return self.spec.max_input_tokens
        cfg = getattr(self.model, "config", None)
        for attr in ("n_positions", "max_position_embeddings"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 512


def get(spec: ModelSpec, device: str) -> LoadedModel:
    key = (spec.name, device)
    with _lock:
        if key not in _cache:
            _cache[key] = load(spec, device)
        return _cache[key]


def load(spec: ModelSpec, device: str) -> LoadedModel:
    if spec.engine == "openai":
        from workers.runners.openai import OpenAIClient

        return LoadedModel(spec=spec, tokenizer=None, model=OpenAIClient(spec), device=None,
                           source=spec.source)
    return load_transformers(spec, device)


def load_transformers(spec: ModelSpec, device: str,
                      transform: Callable[[Any], Any] | None = None) -> LoadedModel:
    """Tokenizer and weights from a local folder, a package, or (online) the hub.

    `transform(model)` runs on the float weights before quantization and the move to the device
    (the sentiment runner merges its adapter there).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # our own logs say what happened
    source = resolve_source(spec)
    auto = getattr(transformers, AUTO_CLASSES[spec.kind])
    dtype = getattr(torch, spec.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision)
        model = auto.from_pretrained(source, revision=spec.revision, dtype=dtype)
    except OSError as exc:
        raise ConfigError(
            f"cannot load model {spec.name!r} from {source!r}: {str(exc).splitlines()[0]}. "
            "Offline, the hub cannot be reached: download it elsewhere (`llmos models pull`) or "
            "point `source` at a local folder in llmos.toml."
        ) from None
    if spec.kind == "causal-lm":
        tokenizer.padding_side = "left"  # generation continues from the right edge
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if transform is not None:
        transform(model)
    torch_device = torch.device(device)
    if spec.quantization == "int8":
        if torch_device.type != "cpu":
            raise ConfigError(f"model {spec.name!r}: quantization = \"int8\" is dynamic int8 for CPU workers")
        import warnings

        # torch.ao's dynamic quantization still works in torch 2.13 but warns that it moves to
        # torchao; see docs/models.md for the measured speed and accuracy.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of torch.ao and qint8 tensors
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.to(torch_device)
    model.eval()
    return LoadedModel(spec=spec, tokenizer=tokenizer, model=model, device=torch_device, source=source)
