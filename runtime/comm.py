"""Communication as `tbo` custom ops, with backends chosen per process group.

Legend: T tokens on this rank, D hidden, K experts per token, W ranks in the group,
E_loc experts owned by each rank.

Every collective is a pair of ops, a start half and a wait half, so a pass can place the two
apart (like `_c10d_functional.X` + `wait_tensor`). The start half returns a *handle*: a one-element
int64 tensor whose storage address keys the pending work in this process; the wait half takes the
handle (and the tensors that fix its output shapes) and returns fresh outputs. Each op has a fake
implementation, so models using them trace under dynamo, aot_autograd and torch.export.

Ops (all in namespace `tbo`):
  dispatch_start(x_TD, topk_ids_TK, topk_w_TK, group, world, experts_per_rank) -> handle
  dispatch_wait(handle, x_TD, topk_ids_TK, group, world) -> (x_RD, ids_RK, w_RK)   R = W*T
      A token goes once to each rank that owns one of its experts. Fixed capacity: rank d sends a
      [T, ...] slab to every rank (rows of tokens with no expert there are zero, ids -1), so shapes
      are static. Received ids are local to this rank (0..E_loc-1) or -1; weights are 0 there.
  combine_start(y_RD, group, world) -> handle ; combine_wait(handle, y_RD, group, world) -> y_TD
      Sends each slab back to its source rank, which sums the partial expert outputs.
  all_gather_start/wait  ([T, ...] -> [W*T, ...]),  reduce_scatter_start/wait ([W*T, ...] -> [T, ...], sum),
  all_reduce_start/wait  (sum).

Backends: a group of one rank runs locally (no comm); otherwise torch.distributed with the
group's process group (gloo on CPU, NCCL on GPU). All ranks of a group must pass the same T
(pad with `agree_num_tokens`); padding rows are zero.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "CommGroup", "register_group", "get_group", "clear_groups", "pending_count",
    "dispatch", "combine", "all_gather", "reduce_scatter", "all_reduce", "agree_num_tokens",
    "COMM_OPS", "START_OPS", "WAIT_OPS",
]


# Step 1: groups -----------------------------------------------------------------------------

@dataclass
class CommGroup:
    name: str
    world: int
    rank: int
    pg: Any = None  # torch.distributed ProcessGroup, None for a single process


_GROUPS: dict[str, CommGroup] = {}


def register_group(name: str, pg=None) -> CommGroup:
    """Register a process group under `name` (what the ops' `group` argument refers to).

    `pg=None` registers a one-rank group (no communication)."""
    import torch.distributed as dist

    if pg is None:
        grp = CommGroup(name, 1, 0, None)
    else:
        grp = CommGroup(name, dist.get_world_size(pg), dist.get_rank(pg), pg)
    _GROUPS[name] = grp
    return grp


def get_group(name: str, world: int) -> CommGroup:
    grp = _GROUPS.get(name)
    if grp is None:
        if world == 1:
            return CommGroup(name, 1, 0, None)
        raise RuntimeError(f"tbo comm group {name!r} (world {world}) is not registered; "
                           "call tbo_compiler.runtime.comm.register_group first")
    if grp.world != world:
        raise RuntimeError(f"tbo comm group {name!r} has {grp.world} ranks, the op was built for {world}")
    return grp


def clear_groups() -> None:
    _GROUPS.clear()
    _PENDING.clear()


# Step 2: pending work, keyed by the handle's storage ---------------------------------------

_PENDING: dict[int, tuple[list, Callable[[], Any]]] = {}
_COUNTER = itertools.count(1)


def _new_handle(like: Tensor, works: list, finish: Callable[[], Any]) -> Tensor:
    handle = torch.full((1,), next(_COUNTER), dtype=torch.int64, device=like.device)
    if handle.data_ptr() in _PENDING:
        # the memory of a handle nobody waited on was reused: that handle is gone, so its entry
        # can never be waited on; drop it rather than let it shadow this one
        log.warning("tbo comm: a start's handle was dropped without its wait")
    _PENDING[handle.data_ptr()] = (works, finish)
    return handle


def _take(handle: Tensor):
    try:
        works, finish = _PENDING.pop(handle.data_ptr())
    except KeyError:
        raise RuntimeError("tbo wait op got a handle with no pending start (waited twice, or the "
                           "start ran in another process)") from None
    for w in works:
        w.wait()
    return finish()


def pending_count() -> int:
    return len(_PENDING)


def _all_gather_into(out, inp, **kw):
    import torch.distributed as dist
    # torch 2.13 renames these (the old names warn); the GPU image's 2.11 has only the old ones
    return getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, inp, **kw)


def _reduce_scatter_into(out, inp, **kw):
    import torch.distributed as dist
    return getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(out, inp, **kw)


def _a2a(out: Tensor, inp: Tensor, grp: CommGroup):
    import torch.distributed as dist

    if inp.numel() == 0:  # every rank has the same shape, so all skip together
        return []
    return [dist.all_to_all_single(out, inp, group=grp.pg, async_op=True)]


# Step 3: the ops ----------------------------------------------------------------------------

def _dispatch_pack(x: Tensor, ids: Tensor, w: Tensor, world: int, e_loc: int):
    """[T,D],[T,K] -> send slabs [W,T,D] x, [W,T,K] local ids (-1 = not this rank), [W,T,K] weights."""
    dest = torch.arange(world, device=ids.device).view(world, 1, 1)
    owner = (ids // e_loc).unsqueeze(0)                       # [1,T,K]
    mine = owner == dest                                       # [W,T,K]
    local_ids = torch.where(mine, ids.unsqueeze(0) - dest * e_loc, torch.full_like(mine, -1, dtype=ids.dtype))
    local_w = torch.where(mine, w.unsqueeze(0).float(), torch.zeros((), dtype=torch.float32, device=w.device))
    has = mine.any(-1, keepdim=True)                            # [W,T,1]
    send_x = torch.where(has, x.unsqueeze(0), torch.zeros((), dtype=x.dtype, device=x.device))
    return send_x, local_ids.to(torch.int32), local_w


@torch.library.custom_op("tbo::dispatch_start", mutates_args=())
def dispatch_start(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, group: str, world: int,
                   experts_per_rank: int) -> Tensor:
    grp = get_group(group, world)
    send_x, send_ids, send_w = _dispatch_pack(x, topk_ids, topk_weights, world, experts_per_rank)
    T, D = x.shape
    K = topk_ids.shape[1]
    if grp.world == 1:
        return _new_handle(x, [], lambda: (send_x.reshape(T, D), send_ids.reshape(T, K).long(),
                                           send_w.reshape(T, K)))
    # ids (int32) and weights (fp32 bit pattern) travel in one int32 slab.
    meta = torch.cat([send_ids, send_w.view(torch.int32)], dim=-1).contiguous()
    recv_x = torch.empty_like(send_x)
    recv_meta = torch.empty_like(meta)
    works = _a2a(recv_x, send_x.contiguous(), grp) + _a2a(recv_meta, meta, grp)

    def finish():
        ids_r = recv_meta[..., :K].reshape(world * T, K).long()
        w_r = recv_meta[..., K:].contiguous().view(torch.float32).reshape(world * T, K)
        return recv_x.reshape(world * T, D), ids_r, w_r

    return _new_handle(x, works, finish)


@dispatch_start.register_fake
def _(x, topk_ids, topk_weights, group, world, experts_per_rank):
    return x.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("tbo::dispatch_wait", mutates_args=())
def dispatch_wait(handle: Tensor, x: Tensor, topk_ids: Tensor, group: str, world: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    return _take(handle)


@dispatch_wait.register_fake
def _(handle, x, topk_ids, group, world):
    R = x.shape[0] * world
    return (x.new_empty(R, x.shape[1]), topk_ids.new_empty(R, topk_ids.shape[1], dtype=torch.int64),
            x.new_empty(R, topk_ids.shape[1], dtype=torch.float32))


@torch.library.custom_op("tbo::combine_start", mutates_args=())
def combine_start(y: Tensor, group: str, world: int) -> Tensor:
    grp = get_group(group, world)
    if grp.world == 1:
        out = y.clone()
        return _new_handle(y, [], lambda: out)
    T = y.shape[0] // world
    send = y.reshape(world, T, *y.shape[1:]).contiguous()
    recv = torch.empty_like(send)
    works = _a2a(recv, send, grp)
    return _new_handle(y, works, lambda: recv.sum(0))


@combine_start.register_fake
def _(y, group, world):
    return y.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("tbo::combine_wait", mutates_args=())
def combine_wait(handle: Tensor, y: Tensor, group: str, world: int) -> Tensor:
    return _take(handle)


@combine_wait.register_fake
def _(handle, y, group, world):
    return y.new_empty(y.shape[0] // world, *y.shape[1:])


@torch.library.custom_op("tbo::all_gather_start", mutates_args=())
def all_gather_start(x: Tensor, group: str, world: int) -> Tensor:

    grp = get_group(group, world)
    if grp.world == 1:
        out = x.clone()
        return _new_handle(x, [], lambda: out)
    out = x.new_empty(world * x.shape[0], *x.shape[1:])
    works = [_all_gather_into(out, x.contiguous(), group=grp.pg, async_op=True)] if x.numel() else []
    return _new_handle(x, works, lambda: out)


@all_gather_start.register_fake
def _(x, group, world):
    return x.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("tbo::all_gather_wait", mutates_args=())
def all_gather_wait(handle: Tensor, x: Tensor, group: str, world: int) -> Tensor:
    return _take(handle)


@all_gather_wait.register_fake
def _(handle, x, group, world):
    return x.new_empty(world * x.shape[0], *x.shape[1:])


@torch.library.custom_op("tbo::reduce_scatter_start", mutates_args=())
def reduce_scatter_start(x: Tensor, group: str, world: int) -> Tensor:
    import torch.distributed as dist

    grp = get_group(group, world)
    if grp.world == 1:
        out = x.clone()
        return _new_handle(x, [], lambda: out)
    T = x.shape[0] // world
    if grp.pg is not None and dist.get_backend(grp.pg) == "gloo":
        # gloo has no reduce_scatter: an all_to_all of the slabs, then a local sum.
        send = x.reshape(world, T, *x.shape[1:]).contiguous()
        recv = torch.empty_like(send)
        return _new_handle(x, _a2a(recv, send, grp), lambda: recv.sum(0))
    out = x.new_empty(T, *x.shape[1:])
    works = [_reduce_scatter_into(out, x.contiguous(), group=grp.pg, async_op=True)] if x.numel() else []
    return _new_handle(x, works, lambda: out)


@reduce_scatter_start.register_fake
def _(x, group, world):
    return x.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("tbo::reduce_scatter_wait", mutates_args=())
def reduce_scatter_wait(handle: Tensor, x: Tensor, group: str, world: int) -> Tensor:
    return _take(handle)


@reduce_scatter_wait.register_fake
def _(handle, x, group, world):
    return x.new_empty(x.shape[0] // world, *x.shape[1:])


@torch.library.custom_op("tbo::all_reduce_start", mutates_args=())
def all_reduce_start(x: Tensor, group: str, world: int) -> Tensor:
    import torch.distributed as dist

    grp = get_group(group, world)
    out = x.clone()
    if grp.world == 1 or x.numel() == 0:
        return _new_handle(x, [], lambda: out)
    works = [dist.all_reduce(out, group=grp.pg, async_op=True)]
    return _new_handle(x, works, lambda: out)


@all_reduce_start.register_fake
def _(x, group, world):
    return x.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("tbo::all_reduce_wait", mutates_args=())
def all_reduce_wait(handle: Tensor, x: Tensor, group: str, world: int) -> Tensor:
    return _take(handle)


@all_reduce_wait.register_fake
def _(handle, x, group, world):
    return torch.empty_like(x)


# Step 4: what the passes need to know about these ops -----------------------------------------

_ops = torch.ops.tbo
#: start overload -> (wait overload, kind)
START_OPS = {
    _ops.dispatch_start.default: (_ops.dispatch_wait.default, "dispatch"),
    _ops.combine_start.default: (_ops.combine_wait.default, "combine"),
    _ops.all_gather_start.default: (_ops.all_gather_wait.default, "all_gather"),
    _ops.reduce_scatter_start.default: (_ops.reduce_scatter_wait.default, "reduce_scatter"),
    _ops.all_reduce_start.default: (_ops.all_reduce_wait.default, "all_reduce"),
}
WAIT_OPS = {w: k for (w, k) in START_OPS.values()}
COMM_OPS = set(START_OPS) | set(WAIT_OPS)


# Step 5: eager conveniences (start + wait back to back) --------------------------------------

def dispatch(x, topk_ids, topk_weights, group: str, world: int, experts_per_rank: int):
    h = _ops.dispatch_start(x, topk_ids, topk_weights, group, world, experts_per_rank)
    return _ops.dispatch_wait(h, x, topk_ids, group, world)


def combine(y, group: str, world: int):
    return _ops.combine_wait(_ops.combine_start(y, group, world), y, group, world)


def all_gather(x, group: str, world: int):
    return _ops.all_gather_wait(_ops.all_gather_start(x, group, world), x, group, world)


def reduce_scatter(x, group: str, world: int):
    return _ops.reduce_scatter_wait(_ops.reduce_scatter_start(x, group, world), x, group, world)


def all_reduce(x, group: str, world: int):
    return _ops.all_reduce_wait(_ops.all_reduce_start(x, group, world), x, group, world)


def agree_num_tokens(num_tokens: int, group: str) -> int:
    """The token count every rank of `group` pads to: the max over ranks (one collective)."""
    import torch.distributed as dist

    grp = _GROUPS.get(group)
    if grp is None or grp.world == 1:
        return num_tokens
    backend = str(dist.get_backend(grp.pg))
    # a group with a CPU backend (gloo, or "cpu:gloo,cuda:nccl") agrees on the host; an NCCL-only
    # group needs a device tensor (and the .item() below then waits for the GPU)
    on_cpu = "gloo" in backend or "cpu" in backend or not torch.cuda.is_available()
    dev = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([num_tokens], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=grp.pg)
    return int(t.item())
