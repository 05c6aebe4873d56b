"""Fake `mori` (ROCm/mori, PyPI amd-mori): `mori.shmem` (init from a torch process group) and
`mori.ops` (EpDispatchCombineConfig / EpDispatchCombineOp with the split-phase calls)."""
from __future__ import annotations

#: every op call: {"op": op uid, "fn": name, "args": {parameter: value}}
CALLS: list[dict] = []

from . import ops, shmem  # noqa: E402,F401
