"""Communication as `tbo` custom ops: schemas, fake implementations and the tables passes read.

Legend: T tokens on this rank, D hidden, K experts per token, W ranks in the group.

Every collective is a pair of ops, a start half and a wait half, so a pass can place the two
apart (like `_c10d_functional.X` + `wait_tensor`). The start half returns a *handle* (a one-element
int64 tensor) that only its wait consumes; the wait half also takes the tensors that fix its output
shapes. All ops move data only: packing tokens per destination (`tbo::dispatch_pack`) and summing
the partial results that come back are compute ops, so they run on the compute stream.

  dispatch_start(send_x_WTD, send_meta_WT2K, group, world) -> handle
  dispatch_wait(handle, send_x, send_meta, group, world) -> (recv_x_WTD, recv_meta_WT2K)
      all-to-all of equal slabs: slab d of the send goes to rank d; slab s of the receive came
      from rank s (fixed capacity T rows per rank, so shapes are static).
  combine_start(y_WTD, group, world) -> handle ; combine_wait(handle, y, group, world) -> partial_WTD
      the same all-to-all back: slab s of the result is rank s's expert output for this rank's
      tokens; the caller sums the W slabs.
  all_gather_start/wait  ([T, ...] -> [W*T, ...]),  reduce_scatter_start/wait ([W*T, ...] -> [T, ...], sum),
  all_reduce_start/wait  (sum).
Every start and wait ends with (group: str, world: int). All ranks of a group pass the same T.

The eager implementations are bound by the runtime (runtime/comm/); the compiled program calls
the comm backends directly, without handles.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tbo_compiler.ops.impl import impl


def _handle(like: Tensor) -> Tensor:
    return like.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("tbo::dispatch_start", mutates_args=())
def dispatch_start(send_x: Tensor, send_meta: Tensor, group: str, world: int) -> Tensor:
    return impl("dispatch_start")(send_x, send_meta, group, world)


@dispatch_start.register_fake
def _(send_x, send_meta, group, world):
    return _handle(send_x)


@torch.library.custom_op("tbo::dispatch_wait", mutates_args=())
def dispatch_wait(handle: Tensor, send_x: Tensor, send_meta: Tensor, group: str, world: int
                  ) -> tuple[Tensor, Tensor]:
    return impl("wait")(handle)


@dispatch_wait.register_fake
def _(handle, send_x, send_meta, group, world):
    return torch.empty_like(send_x), torch.empty_like(send_meta)


@torch.library.custom_op("tbo::combine_start", mutates_args=())
def combine_start(y: Tensor, group: str, world: int) -> Tensor:
    return impl("combine_start")(y, group, world)


@combine_start.register_fake
def _(y, group, world):
    return _handle(y)


@torch.library.custom_op("tbo::combine_wait", mutates_args=())
def combine_wait(handle: Tensor, y: Tensor, group: str, world: int) -> Tensor:
    return impl("wait")(handle)


@combine_wait.register_fake
def _(handle, y, group, world):
    return torch.empty_like(y)


@torch.library.custom_op("tbo::all_gather_start", mutates_args=())
def all_gather_start(x: Tensor, group: str, world: int) -> Tensor:
    return impl("all_gather_start")(x, group, world)


@all_gather_start.register_fake
def _(x, group, world):
    return _handle(x)


@torch.library.custom_op("tbo::all_gather_wait", mutates_args=())
def all_gather_wait(handle: Tensor, x: Tensor, group: str, world: int) -> Tensor:
    return impl("wait")(handle)


@all_gather_wait.register_fake
def _(handle, x, group, world):
    return x.new_empty(world * x.shape[0], *x.shape[1:])


@torch.library.custom_op("tbo::reduce_scatter_start", mutates_args=())
def reduce_scatter_start(x: Tensor, group: str, world: int) -> Tensor:
    return impl("reduce_scatter_start")(x, group, world)


@reduce_scatter_start.register_fake
def _(x, group, world):
    return _handle(x)


@torch.library.custom_op("tbo::reduce_scatter_wait", mutates_args=())
def reduce_scatter_wait(handle: Tensor, x: Tensor, group: str, world: int) -> Tensor:
    return impl("wait")(handle)


@reduce_scatter_wait.register_fake
def _(handle, x, group, world):
    return x.new_empty(x.shape[0] // world, *x.shape[1:])


@torch.library.custom_op("tbo::all_reduce_start", mutates_args=())
def all_reduce_start(x: Tensor, group: str, world: int) -> Tensor:
    return impl("all_reduce_start")(x, group, world)


@all_reduce_start.register_fake
def _(x, group, world):
    return _handle(x)


@torch.library.custom_op("tbo::all_reduce_wait", mutates_args=())
def all_reduce_wait(handle: Tensor, x: Tensor, group: str, world: int) -> Tensor:
    return impl("wait")(handle)


@all_reduce_wait.register_fake
def _(handle, x, group, world):
    return torch.empty_like(x)


# What the passes need to know about these ops -------------------------------------------------

_ops = torch.ops.tbo
#: start overload -> (wait overload, kind); kind names the backend method that runs the start
START_OPS = {
    _ops.dispatch_start.default: (_ops.dispatch_wait.default, "dispatch"),
    _ops.combine_start.default: (_ops.combine_wait.default, "combine"),
    _ops.all_gather_start.default: (_ops.all_gather_wait.default, "all_gather"),
    _ops.reduce_scatter_start.default: (_ops.reduce_scatter_wait.default, "reduce_scatter"),
    _ops.all_reduce_start.default: (_ops.all_reduce_wait.default, "all_reduce"),
}
WAIT_OPS = {w: k for (w, k) in START_OPS.values()}
#: kind -> what the wait's result holds of the payload's token blocks: the same blocks ("same"),
#: W times as many ("gather": every rank's), or 1/W of them ("scatter")
TOKEN_BLOCKS = {"dispatch": "same", "combine": "same", "all_gather": "gather",
                "reduce_scatter": "scatter", "all_reduce": "same"}


def group_world(node_args: tuple) -> tuple[str, int]:
    """(group, world) of a tbo comm op's arguments: always its last two."""
    return node_args[-2], node_args[-1]


# Eager conveniences (start + wait back to back) -------------------------------------------------

def dispatch(send_x, send_meta, group: str, world: int):
    return _ops.dispatch_wait(_ops.dispatch_start(send_x, send_meta, group, world), send_x, send_meta,
                              group, world)


def combine(y, group: str, world: int):
    return _ops.combine_wait(_ops.combine_start(y, group, world), y, group, world)


def all_gather(x, group: str, world: int):
    return _ops.all_gather_wait(_ops.all_gather_start(x, group, world), x, group, world)


def reduce_scatter(x, group: str, world: int):
    return _ops.reduce_scatter_wait(_ops.reduce_scatter_start(x, group, world), x, group, world)


def all_reduce(x, group: str, world: int):
    return _ops.all_reduce_wait(_ops.all_reduce_start(x, group, world), x, group, world)
