"""Comm backends behind one selector, as the kernels are (runtime/kernels/__init__.py).

A backend is one module of this package with the same small interface:
    NAME                          its name in logs, TBO_COMM and register_group(..., backend=)
    probe() -> (bool, str)        whether it can run in this process, and why not (tried once)
    BACKEND                       the class; BACKEND(group) has the methods of `CommBackend`
Adding one (a DeepEP or UCCL binding, say) is a module and one line in MODULES.

The selector:
    default_backend_name(pg)      which backend a multi-rank group takes: TBO_COMM when set; else
                                  mori on ROCm builds of torch over NCCL when mori imports; else
                                  nccl over NCCL, torch_dist over gloo (`native_backend_name`)
    make_backend(name, group)     the backend object; a backend that does not probe falls back to
                                  the group's native backend, saying so in one log line per process
"""
from __future__ import annotations

import importlib
import logging
from typing import Protocol

import torch
from torch import Tensor

from tbo_compiler.ops.errors import RuntimeFailure
from tbo_compiler.runtime.env import flag

log = logging.getLogger(__name__)


class Pending(Protocol):
    def wait(self): ...   # the collective's result (a tensor, or a (x, meta) pair for dispatch)


class CommBackend(Protocol):
    """One method per comm kind: each starts the collective and returns what `wait()` finishes."""
    name: str

    def dispatch(self, send_x: Tensor, send_meta: Tensor) -> Pending: ...
    def combine(self, y: Tensor) -> Pending: ...
    def all_gather(self, x: Tensor) -> Pending: ...
    def reduce_scatter(self, x: Tensor) -> Pending: ...
    def all_reduce(self, x: Tensor) -> Pending: ...


#: backend name -> module (relative to this package)
MODULES = {"local": ".local", "torch_dist": ".torch_dist", "nccl": ".nccl", "null": ".null", "mori": ".mori"}
_LOGGED: set[str] = set()   # fallbacks already logged


def _module(name: str):
    if name not in MODULES:
        raise RuntimeFailure(f"unknown comm backend {name!r} ({', '.join(MODULES)})")
    return importlib.import_module(MODULES[name], __package__)


def native_backend_name(pg) -> str:
    """What the process group's own collectives give: nccl over NCCL, torch_dist otherwise."""
    import torch.distributed as dist

    return "nccl" if "nccl" in str(dist.get_backend(pg)) else "torch_dist"


def _usable(name: str, pg) -> bool:
    ok, why = _module(name).probe()
    if not ok:
        fallback = native_backend_name(pg)
        if fallback not in _LOGGED:  # once per process (per fallback)
            _LOGGED.add(fallback)
            log.info("comm backend %s is unavailable (%s); falling back to %s", name, why, fallback)
    return ok


def default_backend_name(pg) -> str:
    import torch.distributed as dist

    if pg is None or dist.get_world_size(pg) == 1:
        return "local"
    if flag("TBO_COMM"):
        return flag("TBO_COMM")
    if getattr(torch.version, "hip", None) and "nccl" in str(dist.get_backend(pg)) and _usable("mori", pg):
        return "mori"
    return native_backend_name(pg)


def make_backend(name: str, group) -> CommBackend:
    if not _usable(name, group.pg):
        name = native_backend_name(group.pg)
    return _module(name).BACKEND(group)
