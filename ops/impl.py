"""Where an op's eager implementation comes from: a slot the runtime fills.

The op vocabulary (this package) imports only torch, so it cannot name a backend. Each custom op's
Python body calls `impl(name)(...)`; the runtime binds one callable per op name when it is
imported (`tbo_compiler/__init__.py` imports it, so any use of the package has them). The compiled
program does not come through here: it resolves its backends once, when it is built.
"""
from __future__ import annotations

from typing import Callable

from tbo_compiler.ops.errors import RuntimeFailure

_IMPLS: dict[str, Callable] = {}


def bind(name: str, fn: Callable) -> None:
    _IMPLS[name] = fn


def impl(name: str) -> Callable:
    fn = _IMPLS.get(name)
    if fn is None:
        raise RuntimeFailure(f"no implementation bound for tbo::{name}; import tbo_compiler (which "
                             "imports its runtime) before calling the op")
    return fn
