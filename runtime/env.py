"""Environment flags of the runtime, parsed with a one-line error naming the flag."""
from __future__ import annotations

import os

from tbo_compiler.ops.errors import RuntimeFailure


def _env(name: str, default, cast, what: str):
    raw = os.environ.get(name, "").strip()
    try:
        return cast(raw) if raw else default
    except ValueError:
        raise RuntimeFailure(f"{name}={raw!r} is not {what}") from None


def env_int(name: str, default: int) -> int:
    return _env(name, default, int, "an integer")


def env_float(name: str, default: float) -> float:
    return _env(name, default, float, "a number")


COMM_TIMEOUT_ENV = "TBO_COMM_TIMEOUT_S"


def comm_timeout_s() -> float:
    """How long a collective of the runtime may wait for its peers before the rank fails with an
    error naming them (TBO_COMM_TIMEOUT_S, default 300 s)."""
    value = env_float(COMM_TIMEOUT_ENV, 300.0)
    if value <= 0:
        raise RuntimeFailure(f"{COMM_TIMEOUT_ENV}={value} must be a positive number of seconds")
    return value
