"""The `llmos beat` command (registered by llmos/cli.py); the work is in llmos.nightly.beat."""

from __future__ import annotations

import typer


def beat_command() -> None:
    """Run the [[schedule]] entries of llmos.toml with Celery beat: each new file of a schedule's
    folder becomes a batch once, its results are written beside it; one summary line per tick."""
    from llmos.nightly.beat import run_beat
    from llmos.settings import get_settings

    raise typer.Exit(run_beat(get_settings()))
