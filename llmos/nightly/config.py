"""The `[[schedule]]` entries of llmos.toml, read and checked once, at the start of `llmos beat`.

    [[schedule]]
    name = "nightly"                 # batches are named "<name>:<file name>"
    cron = "0 2 * * *"               # minute hour day-of-month month day-of-week (beat's timezone, UTC)
    # every_s = 60                   # or an interval in seconds, instead of cron
    input_dir = "/data/incoming"     # relative paths: from the folder llmos.toml is in
    pattern = "*.jsonl"              # default
    task = "summarize"               # plain lines' task type (OpenAI batch lines carry their own)
    model = "distilbart"
    output_dir = "/data/done"        # default: input_dir
    priority = "batch"               # default
    options = { max_sentences = 2 }  # task options for every line
    tenant = "acme"                  # default: the default tenant
    settle_s = 5                     # a file modified more recently waits for a later tick

Every problem is a ConfigError naming the file, the entry and the key, so a bad schedule stops
beat at start rather than at 2 a.m.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from llmos.errors import ConfigError, LLMOSError
from llmos.settings import Settings, config_path

KEYS = ("name", "cron", "every_s", "input_dir", "pattern", "task", "model", "output_dir", "priority",
        "options", "tenant", "settle_s")
"""The keys a [[schedule]] entry may have."""

CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
"""A cron expression's five fields in order, as celery.schedules.crontab names them."""

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_PATTERN = "*.jsonl"
DEFAULT_PRIORITY = "batch"
DEFAULT_SETTLE_S = 5.0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One [[schedule]] entry, checked: its folders exist and its model can run its task."""

    name: str
    input_dir: Path
    output_dir: Path
    cron: str | None = None
    every_s: float | None = None
    pattern: str = DEFAULT_PATTERN
    task: str | None = None
    model: str | None = None
    priority: int | str = DEFAULT_PRIORITY
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    tenant: str | None = None
    settle_s: float = DEFAULT_SETTLE_S

    def celery_schedule(self) -> Any:
        """The celery.schedules object beat runs this entry on (a crontab, or an interval)."""
        from celery.schedules import crontab, schedule

        if self.cron is not None:
            return crontab(**dict(zip(CRON_FIELDS, self.cron.split())))
        return schedule(self.every_s)

    def when(self) -> str:
        return f"cron {self.cron!r}" if self.cron is not None else f"every {self.every_s:g} s"


def load_schedules(settings: Settings) -> list[Schedule]:
    """Every [[schedule]] of the configuration file, checked (ConfigError when there is none)."""
    path = config_path(settings)
    if path is None:
        raise ConfigError("no configuration file: `llmos beat` runs the [[schedule]] entries of "
                          "llmos.toml (LLMOS_CONFIG, or ./llmos.toml); see docs/batch.md")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    schedules = parse_schedules(data, path, settings)
    if not schedules:
        raise ConfigError(f"{path} has no [[schedule]] entry: nothing for `llmos beat` to run "
                          "(see docs/batch.md, \"The nightly schedule\")")
    return schedules


def parse_schedules(data: dict[str, Any], path: Path, settings: Settings | None = None,
                    registry: Any = None) -> list[Schedule]:
    """The checked [[schedule]] entries of a parsed TOML document read from `path`.

    Relative folders are taken from `path`'s folder. `registry` (default: the registry of
    `settings`) is what model names are checked against.
    """
    entries = data.get("schedule", [])
    if isinstance(entries, dict):
        raise ConfigError(f"{path}: schedule must be an array of tables: write [[schedule]], not [schedule]")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path}: schedule must be an array of tables ([[schedule]] entries)")
    if entries and registry is None:
        from llmos.registry import Registry

        registry = Registry.load(settings or Settings())
    out: list[Schedule] = []
    for i, entry in enumerate(entries):
        schedule = _parse_one(entry, i, path, registry)
        if any(s.name == schedule.name for s in out):
            raise ConfigError(f"{path}: two [[schedule]] entries are named {schedule.name!r}: names must "
                              "be unique (batch names are derived from them)")
        out.append(schedule)
    return out


def _parse_one(entry: dict[str, Any], index: int, path: Path, registry: Any) -> Schedule:
    name = entry.get("name")
    where = f"{path}: [[schedule]] {name!r}" if isinstance(name, str) else f"{path}: [[schedule]] #{index + 1}"
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{where}: name must be 1-64 letters, digits, '_', '.' or '-' "
                          f"(it starts every batch name of the schedule), got {name!r}")

    cron, every_s = entry.get("cron"), entry.get("every_s")
    if (cron is None) == (every_s is None):
        raise ConfigError(f"{where}: give cron (a 5-field cron expression, e.g. \"0 2 * * *\") or every_s "
                          "(seconds between ticks), one of the two")
    if cron is not None:
        cron = _cron(where, cron)
    else:
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not (
                math.isfinite(every_s) and every_s > 0):
            raise ConfigError(f"{where}: every_s must be a number of seconds above 0, got {every_s!r}")
        every_s = float(every_s)

    input_dir = _folder(where, path, entry, "input_dir")
    if not input_dir.is_dir():
        raise ConfigError(f"{where}: input_dir {input_dir} is not a folder (create it, or fix the path)")
    output_dir = _folder(where, path, entry, "output_dir") if "output_dir" in entry else input_dir
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create output_dir {output_dir}: {exc}") from None
    if not output_dir.is_dir():
        raise ConfigError(f"{where}: output_dir {output_dir} is not a folder")

    pattern = entry.get("pattern", DEFAULT_PATTERN)
    if not isinstance(pattern, str) or not pattern or "/" in pattern or pattern.startswith(".."):
        raise ConfigError(f"{where}: pattern must be a file name pattern such as \"*.jsonl\" "
                          f"(no folders), got {pattern!r}")

    task, model = entry.get("task"), entry.get("model")
    if task is not None:
        from llmos.tasks import TASK_TYPES

        if not isinstance(task, str) or task not in TASK_TYPES:
            raise ConfigError(f"{where}: unknown task {task!r}; known: {', '.join(sorted(TASK_TYPES))}")
    if model is not None:
        if not isinstance(model, str):
            raise ConfigError(f"{where}: model must be a model name, got {model!r}")
        try:
            spec = registry.get(model)
            if task is not None:
                spec.require_task(task)
        except LLMOSError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    priority = entry.get("priority", DEFAULT_PRIORITY)
    from llmos.priority import parse_priority

    from llmos.batches.lines import MAX_BATCH_PRIORITY

    try:
        if parse_priority(priority) > MAX_BATCH_PRIORITY:
            raise ConfigError(f"a batch runs at normal ({MAX_BATCH_PRIORITY}) or lower, got {priority!r}")
    except LLMOSError as exc:
        raise ConfigError(f"{where}: priority: {exc}") from None

    options = entry.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options must be a table of task options, e.g. "
                          f"options = {{ max_sentences = 2 }}, got {options!r}")
    tenant = entry.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or not tenant.strip()):
        raise ConfigError(f"{where}: tenant must be a tenant name, got {tenant!r}")
    settle_s = entry.get("settle_s", DEFAULT_SETTLE_S)
    if isinstance(settle_s, bool) or not isinstance(settle_s, (int, float)) or not (
            math.isfinite(settle_s) and settle_s >= 0):
        raise ConfigError(f"{where}: settle_s must be a number of seconds, 0 or more, got {settle_s!r}")
    return Schedule(name=name, input_dir=input_dir, output_dir=output_dir, cron=cron, every_s=every_s,
                    pattern=pattern, task=task, model=model, priority=priority, options=dict(options),
                    tenant=tenant, settle_s=float(settle_s))


def _cron(where: str, cron: Any) -> str:
    from celery.schedules import crontab

    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise ConfigError(f"{where}: cron must be 5 fields (minute hour day-of-month month day-of-week), "
                          f"e.g. \"0 2 * * *\", got {cron!r}")
    fields = cron.split()
    for field, value in zip(CRON_FIELDS, fields):  # each alone first, so the message names the field
        try:
            crontab(**{field: value})
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise ConfigError(f"{where}: cron {cron!r}: its {field.replace('_', '-')} field {value!r} "
                              f"is invalid: {exc}") from None
    try:
        crontab(**dict(zip(CRON_FIELDS, fields)))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ConfigError(f"{where}: cron {cron!r} is invalid: {exc}") from None
    return " ".join(fields)


def _folder(where: str, path: Path, entry: dict[str, Any], key: str) -> Path:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} must be a folder path, got {value!r}")
    folder = Path(value).expanduser()
    return (folder if folder.is_absolute() else path.parent / folder).resolve()
