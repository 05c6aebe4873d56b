"""Environment flags of the runtime, parsed with a one-line error naming the flag."""
from __future__ import annotations

import os

from tbo_compiler.ops.errors import RuntimeFailure


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise RuntimeFailure(f"{name}={raw!r} is not an integer") from None
