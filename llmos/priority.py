"""The one place that turns user priorities (0–9, 9 most urgent, or names) into broker priorities.

Celery's Redis transport treats 0 as the highest priority and puts a message without a
priority in the top list, so every send goes through `broker_priority`.
"""

from __future__ import annotations

from llmos.constants import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, PRIORITY_NAMES
from llmos.errors import ValidationError


def parse_priority(value: int | str | None) -> int:
    """Return the user priority 0–9 for an int, a digit string or a name (None: default)."""
    if value is None:
        return DEFAULT_PRIORITY
    if isinstance(value, bool):
        raise ValidationError(f"priority must be 0–9 or one of {sorted(PRIORITY_NAMES)}, got {value!r}")
    if isinstance(value, str):
        key = value.strip().lower()
        if key in PRIORITY_NAMES:
            return PRIORITY_NAMES[key]
        if len(key) == 1 and key in "0123456789":  # not str.isdigit: "²" is a digit to it
            value = int(key)
        else:
            raise ValidationError(
                f"unknown priority {value!r}: use 0–9 (9 most urgent) or one of "
                + ", ".join(f"{k}={v}" for k, v in PRIORITY_NAMES.items())
            )
    if not isinstance(value, int) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ValidationError(f"priority must be an integer 0–9 (9 most urgent), got {value!r}")
    return value


def broker_priority(user_priority: int) -> int:
    """Celery/Redis priority for a user priority: 9 (most urgent) → 0 (first served)."""
    return MAX_PRIORITY - parse_priority(user_priority)
