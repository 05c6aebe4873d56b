"""Comm groups and their backends; the eager implementations of the `tbo` comm ops.

A group is registered under the name the ops' `group` argument uses, with a torch.distributed
process group (or none: one rank). Its backend is chosen from the process group by one selector
(select.py: the backend protocol, the table of modules, the fallback), one module each:
    local       one rank: no communication
    torch_dist  async work handles (gloo on CPU; eager use)
    nccl        stream-ordered, capturable in a CUDA graph (what compiled programs use on NCCL)
    null        no communication at all: timing compute alone (bench), never for results
    mori        ROCm: dispatch/combine through mori, one op per ubatch (the default on ROCm when mori
                imports; TBO_COMM=name picks the backend of every multi-rank group)
A backend object has one method per comm kind (dispatch, combine, all_gather, reduce_scatter,
all_reduce); each starts the collective and returns an object whose `wait()` gives the result.

Compiled programs call those methods directly. The eager custom ops (a model called as plain
PyTorch) need a tensor to carry between their start and wait halves: the start returns a one-element
*handle* tensor whose storage address keys the pending result here.

A peer that dies or hangs: every host-side wait is bounded by TBO_COMM_TIMEOUT_S and fails with a
one-line PeerFailure naming the peer (faults.py); `announce_failure(exc)` in a rank's last handler
lets its peers quote its error.
"""
from __future__ import annotations

import atexit
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tbo_compiler.ops import impl as op_impl
from tbo_compiler.ops.errors import RuntimeFailure
from tbo_compiler.runtime.comm.faults import (PeerFailure, announce_failure, bounded_collective, synchronize,
                                               timed_opts)
from tbo_compiler.runtime.comm.select import default_backend_name, make_backend

log = logging.getLogger(__name__)

__all__ = ["CommGroup", "register_group", "get_group", "clear_groups", "pending_count", "backend_for",
           "agree_num_tokens", "gather_records", "register_default_group", "PeerFailure", "announce_failure",
           "synchronize"]


# Step 1: groups and their backends ------------------------------------------------------------

@dataclass
class CommGroup:
    name: str
    world: int
    rank: int
    pg: Any = None           # torch.distributed ProcessGroup, None for a single process
    backend_name: str = "local"

    def backend(self, name: str | None = None):
        return make_backend(name or self.backend_name, self)


_GROUPS: dict[str, CommGroup] = {}


def register_group(name: str, pg=None, backend: str | None = None) -> CommGroup:
    """Register a process group under `name` (what the ops' `group` argument refers to).

    `pg=None` registers a one-rank group (no communication)."""
    import torch.distributed as dist

    if pg is None:
        grp = CommGroup(name, 1, 0, None, "local")
    else:
        grp = CommGroup(name, dist.get_world_size(pg), dist.get_rank(pg), pg, backend or default_backend_name(pg))
    make_backend(grp.backend_name, grp)  # an unknown name fails here, not at the first collective
    _GROUPS[name] = grp
    log.info("comm group %s: %d ranks, backend %s", name, grp.world, grp.backend_name)
    return grp


def register_default_group(name: str, world: int) -> CommGroup | None:
    """If torch.distributed is initialised with `world` ranks and `name` is not registered yet,
    register the default (WORLD) process group under it. None when that is not possible."""
    import torch.distributed as dist

    if name in _GROUPS:
        return _GROUPS[name]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world:
        return register_group(name, dist.group.WORLD)
    return None


def get_group(name: str, world: int) -> CommGroup:
    grp = _GROUPS.get(name)
    if grp is None:
        if world == 1:
            return CommGroup(name, 1, 0, None, "local")
        raise RuntimeFailure(f"tbo comm group {name!r} (world {world}) is not registered: initialise "
                             "torch.distributed with that many ranks, or call "
                             "tbo_compiler.runtime.comm.register_group first")
    if grp.world != world:
        raise RuntimeFailure(f"tbo comm group {name!r} has {grp.world} ranks, the op was built for {world}")
    return grp


def backend_for(group: str, world: int, override: str | None = None):
    return get_group(group, world).backend(override)


def clear_groups() -> None:
    _GROUPS.clear()
    _PENDING.clear()


@atexit.register
def _release_groups() -> None:
    """At exit, while the interpreter is still whole: a process group still referenced by this
    registry, or by runtime objects in reference cycles (plans, backends), would be freed during
    finalisation, where gloo's worker threads can abort the process ("terminate called without an
    active exception")."""
    import gc

    clear_groups()
    gc.collect()


# Step 2: the eager ops: pending results keyed by the handle's storage ---------------------------

_PENDING: dict[int, Any] = {}
_COUNTER = itertools.count(1)


def _new_handle(like: Tensor, pending) -> Tensor:
    handle = torch.full((1,), next(_COUNTER), dtype=torch.int64, device=like.device)
    if handle.data_ptr() in _PENDING:
        # the memory of a handle nobody waited on was reused: that handle is gone, so its entry
        # can never be waited on; drop it rather than let it shadow this one
        log.warning("tbo comm: a start's handle was dropped without its wait")
    _PENDING[handle.data_ptr()] = pending
    return handle


def _wait(handle: Tensor):
    try:
        pending = _PENDING.pop(handle.data_ptr())
    except KeyError:
        raise RuntimeFailure("tbo wait op got a handle with no pending start (waited twice, or the "
                             "start ran in another process)") from None
    return pending.wait()


def _eager_start(kind: str):
    def start(*args):
        *tensors, group, world = args
        return _new_handle(tensors[0], getattr(backend_for(group, world), kind)(*tensors))
    return start


def pending_count() -> int:
    return len(_PENDING)


for _kind in ("dispatch", "combine", "all_gather", "reduce_scatter", "all_reduce"):
    op_impl.bind(f"{_kind}_start", _eager_start(_kind))
op_impl.bind("wait", _wait)


# Step 3: agreements: the one per step, and the one per compiled graph ----------------------------------------------------------

def agree_num_tokens(num_tokens: int, group: str) -> int:
    """The token count every rank of `group` pads to: the max over ranks (one collective, and the
    one host synchronisation of a step). Bounded by TBO_COMM_TIMEOUT_S: a peer that died or hangs
    makes this raise PeerFailure naming it (faults.py), on NCCL too, where the collective queues
    behind whatever the previous step left spinning on the GPU."""
    import torch.distributed as dist
    from torch._C import _distributed_c10d as c10d

    grp = _GROUPS.get(group)
    if grp is None or grp.world == 1:
        return num_tokens
    backend = str(dist.get_backend(grp.pg))
    # a group with a CPU backend (gloo, or "cpu:gloo,cuda:nccl") agrees on the host; an NCCL-only
    # group needs a device tensor (and the .item() below then waits for the GPU)
    on_cpu = "gloo" in backend or "cpu" in backend or not torch.cuda.is_available()
    dev = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    # a fill, not a copy from the host: a pageable copy would block behind a collective left spinning
    t = torch.full((1,), num_tokens, dtype=torch.int64, device=dev)
    bounded_collective(grp, "agree_num_tokens", lambda timeout_s: grp.pg.allreduce(
        [t], timed_opts(c10d.AllreduceOptions, timeout_s, reduceOp=dist.ReduceOp.MAX)), on_cpu)
    return int(t.item())


_RECORD_BYTES = 4096


def gather_records(pg, record: dict) -> list[dict]:
    """Every rank's `record` (a small JSON object; strings cut to 1,500 characters), in rank
    order: how the ranks of a torch.compile'd graph agree on its compile outcome. One fixed-size
    all_gather on `pg`'s device, bounded by TBO_COMM_TIMEOUT_S like the runtime's collectives: a
    peer that died or hangs while compiling fails it with one line naming it."""
    import json

    import torch.distributed as dist
    from torch._C import _distributed_c10d as c10d
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    record = {k: (v[:1500] if isinstance(v, str) else v) for k, v in record.items()}
    raw = json.dumps(record).encode()
    with unset_fake_temporarily():  # the compiler runs under dynamo's fake mode; this is real comm
        dev = torch.device("cpu")
        if dist.get_backend(pg) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        buf = torch.zeros(_RECORD_BYTES, dtype=torch.uint8)
        buf[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        buf = buf.to(dev)
        outs = [torch.empty_like(buf) for _ in range(dist.get_world_size(pg))]
        grp = CommGroup("torch.compile agreement", dist.get_world_size(pg), dist.get_rank(pg), pg)
        bounded_collective(grp, "compile agreement", lambda timeout_s: pg.allgather(
            [outs], [buf], timed_opts(c10d.AllgatherOptions, timeout_s)), buf.device.type == "cpu")
        return [json.loads(bytes(o.cpu().tolist()).rstrip(b"\0").decode()) for o in outs]
