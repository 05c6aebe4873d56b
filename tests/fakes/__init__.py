"""Stand-ins for the ROCm libraries tbo-compiler calls, for CPU tests: `aiter` and `mori`.

Each fake exposes the documented Python API of the calls the backends make (same parameter names
and defaults, so a misnamed keyword is a TypeError), checks every argument against the documented
contract (shapes, dtypes, the CSR batch of aiter's MLA, mori's split-phase state per op) and
raises `ContractError` on a violation, then computes with tbo-compiler's torch reference (aiter) or
moves the tokens over the torch process group (mori), so outputs are compared for real. Every call
is recorded in `CALLS` (aiter) / `mori.CALLS`.

    install(sys.modules)   put both fakes under their real names (a fixture does it with monkeypatch)
    modules()              {"aiter": ..., "aiter.mla": ..., "mori.ops": ..., ...}
    reset()                forget recorded calls and mori's shmem state
    ranks.rank_rocm        what each rank of the EP=2 test in tests/test_rocm.py runs
"""
from __future__ import annotations

import importlib

_NAMES = ("aiter", "aiter.mla", "aiter.fused_moe", "mori", "mori.ops", "mori.shmem")


class ContractError(AssertionError):
    """An argument that the real library would reject or misread."""


def check(cond, msg: str) -> None:
    if not cond:
        raise ContractError(msg)


def modules() -> dict:
    return {name: importlib.import_module(f"{__name__}.{name}") for name in _NAMES}


def install(target: dict) -> None:
    target.update(modules())


def reset() -> None:
    mods = modules()
    mods["aiter"].CALLS.clear()
    mods["mori"].CALLS.clear()
    mods["mori.shmem"].STATE.clear()
