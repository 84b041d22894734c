"""Validation helpers the structured-config schemas share: each failure is a ConfigError naming
the key and the received value.
"""

from __future__ import annotations

from experiments.errors import ConfigError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: object, choices: tuple) -> None:
    require(value in choices, f"`{key}` must be one of {choices}. Received: {key}={value!r}")


def check_at_least(key: str, value: float | None, low: float, *,
                   allow_none: bool = False) -> None:
    ok = (allow_none and value is None) or (value is not None and value >= low)
    require(ok, f"`{key}` must be >= {low}{' or null' if allow_none else ''}. "
            f"Received: {key}={value!r}")


def check_fraction(key: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    require(low_ok and value < 1, f"`{key}` must be in {'[0' if allow_zero else '(0'}, 1). "
            f"Received: {key}={value!r}")
