"""The `llmos capacity` and `llmos plan` commands (registered by llmos/cli.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from llmos.errors import ValidationError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, what: str) -> float:
    """"2s", "500ms", "10m", "1h" or a plain number of seconds → seconds (> 0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise ValidationError(f"{what} must be a positive duration such as 2s, 500ms, 10m or 1h, not {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}g}"


def capacity_command(
        target_wait: Annotated[str, typer.Option("--target-wait", metavar="DURATION", help="Mean wait the workers_needed column aims for, e.g. 2s, 500ms.")] = "2s",
        window: Annotated[str, typer.Option("--window", metavar="DURATION", help="The past the rates are measured over, e.g. 10m, 1h.")] = "10m",
        as_json: Annotated[bool, typer.Option("--json", help="One JSON array: a line per model.")] = False) -> None:
    """Per model: arrival rate λ, service rate μ per worker, workers c, utilisation ρ, P(wait) and mean
    wait (Erlang C), the same corrected for measured variability (Allen–Cunneen), the measured wait,
    and the workers the target wait needs. ρ ≥ 1: the queue grows, the wait is infinite."""
    from llmos.db import check_database, get_engine
    from llmos.registry import Registry
    from llmos.scheduling.capacity import capacity_report
    from llmos.settings import get_settings

    target_s = parse_duration(target_wait, "--target-wait")
    window_s = parse_duration(window, "--window")
    settings = get_settings()
    check_database(settings.db_url)
    rows = capacity_report(get_engine(settings.db_url), Registry.load(settings), target_wait_s=target_s,
                           window_s=window_s)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    console = Console()
    if not rows:
        console.print(f"no jobs and no workers in the last {window}")
        return
    table = Table(title=f"capacity over the last {window} (target wait {target_wait})")
    for col in ("model", "λ/s", "μ/s", "workers", "ρ", "P(wait)", "wait M/M/c s", "wait corrected s",
                "measured s", "needed"):
        table.add_column(col, justify="left" if col == "model" else "right")
    notes = []
    for r in rows:
        rho = r["utilization"]
        grows = r["mu_per_s"] is not None and r["lambda_per_s"] > 0 and (rho is None or rho >= 1)
        wait = "∞" if grows else _fmt(r["mean_wait_s"])
        corrected = "∞" if grows else _fmt(r["mean_wait_corrected_s"])
        if grows:
            notes.append(f"{r['model']}: arrivals outpace its {r['workers']} worker(s) (ρ ≥ 1): "
                         "the queue grows without bound")
        table.add_row(r["model"], _fmt(r["lambda_per_s"]), _fmt(r["mu_per_s"]), str(r["workers"]),
                      _fmt(rho), _fmt(r["p_wait"]), wait, corrected, _fmt(r["measured_wait_s"]),
                      "-" if r["workers_needed"] is None else str(r["workers_needed"]))
    console.print(table)
    for n in notes:
        console.print(n, highlight=False)


def plan_command(
        devices_file: Annotated[Optional[Path], typer.Option("--devices", metavar="FILE", help="A TOML file whose [[device]] entries to plan for (default: llmos.toml's, else this host's).")] = None,
        target_wait: Annotated[str, typer.Option("--target-wait", metavar="DURATION", help="Mean wait the plan sizes workers for.")] = "2s",
        window: Annotated[Optional[str], typer.Option("--window", metavar="DURATION", help="The past demand is measured over (default LLMOS_PLAN_WINDOW_S, 10m).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="The plan as JSON.")] = False) -> None:
    """The plan for now: how many workers of which model on which device, what it would evict, the
    models no device can hold, and why."""
    from llmos.db import check_database, get_engine
    from llmos.errors import ConfigError
    from llmos.registry import Registry
    from llmos.scheduling.devices import read_devices
    from llmos.scheduling.placement import make_plan
    from llmos.settings import get_settings

    target_s = parse_duration(target_wait, "--target-wait")
    window_s = parse_duration(window, "--window") if window is not None else None
    settings = get_settings()
    device_list = None
    if devices_file is not None:
        if not devices_file.is_file():
            raise ConfigError(f"--devices {devices_file}: no such file")
        device_list = read_devices(devices_file)
        if not device_list:
            raise ConfigError(f"--devices {devices_file}: it declares no [[device]]")
    check_database(settings.db_url)
    p = make_plan(settings, get_engine(settings.db_url), Registry.load(settings), window_s=window_s,
                  target_wait_s=target_s, device_list=device_list)
    if as_json:
        typer.echo(json.dumps(p.to_json()))
        return
    console = Console()
    table = Table(title="plan")
    for col in ("host", "device", "model", "workers"):
        table.add_column(col, justify="right" if col == "workers" else "left")
    for pl in p.placements:
        table.add_row(pl.host, pl.device, pl.model, str(pl.workers))
    console.print(table if p.placements else "no workers: no model has demand")
    for pl in p.evict:
        console.print(f"evict: {pl.workers} worker(s) of {pl.model} on {pl.host}/{pl.device}", highlight=False)
    for model, why in sorted(p.refused.items()):
        console.print(f"refused: {why}", highlight=False)
    for reason in p.reasons:
        console.print(f"why: {reason}", highlight=False)
