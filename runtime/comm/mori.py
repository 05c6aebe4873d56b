"""mori dispatch/combine (ROCm): one EpDispatchCombineOp per ubatch, split phase on the start/wait halves.

Untested on hardware (no AMD GPU here): written against mori's documented Python API (PyPI
`amd-mori`, import `mori`) and tested on CPU with a fake `mori` (tests/fakes/mori) that moves the
tokens over gloo and checks every argument and the split-phase state of each op. Only dispatch and
combine go through mori; all_gather, reduce_scatter and all_reduce go to the group's other backend
(nccl, i.e. RCCL, on a "cpu:gloo,cuda:nccl" group; torch_dist on gloo).

Chosen by `register_group(..., backend="mori")`, by TBO_COMM=mori, or by default on ROCm builds of
torch when mori imports (a group whose process group has NCCL). When mori does not import the group
keeps its native backend, with one log line (the selector's fallback: select.py).

Setup (once per process, when the first mori backend is made): the group's process group is
registered with torch under "tbo_<group>" and `mori.shmem.shmem_torch_process_group_init` is called
with that name (TBO_MORI_SHMEM_INIT=0 skips both when the engine has initialised mori's shmem);
`finalize()` undoes it (call it before destroying the process group).

Ops: each exchange (a dispatch and its combine) takes one of the group's two ops, the one no other
exchange holds, so the two ubatches in flight never share an op: mori keeps the state of an exchange
(its routing, its receive buffers) in the op between the send and the receive halves and between
dispatch and combine. In the TBO schedule (interleaved, A before B in each stage; each wait right
after its start) ubatch u's exchanges take op u; in a sequential order one exchange is in flight at
a time and takes op 0. A combine belongs to the oldest exchange whose dispatch has been received:
the schedule issues combines in the order of their dispatches (the comm stream is FIFO), and a
combine whose payload has the wrong shape for it is refused. Ops are made on first use, sized for
the call's tokens per rank (TBO_MORI_MAX_TOKENS=N sizes them for N up front, so one pair serves
every bucket; otherwise a larger bucket makes a new pair and the old ops stay, since captured graphs
may use them). Making an op is collective (mori synchronises and barriers): all ranks run the same
program, so they make them in the same order, in the warm-up run before any graph capture.

Halves (TBO_MORI_KERNEL, default AsyncLL: mori's split-phase kernels)
    dispatch start   op.dispatch_send(input, weights, scales, indices)
    dispatch wait    op.dispatch_recv(); the received tokens copied out as the tbo layout (below)
    combine start    op.combine_send(input, weights=None, indices)
    combine wait     op.combine_recv(); the result copied out; op.reset() (mori: between iterations)
With a single-phase kernel type (TBO_MORI_KERNEL=IntraNode) the starts call op.dispatch / op.combine
and the waits only copy out. Everything runs on the current (comm) stream, ordered like NCCL's.

Mapping the slab all-to-all ops onto mori's token routing
  tbo's dispatch moves W slabs that `tbo::dispatch_pack` prepared: slab d holds every token (zero
  where it has no expert on rank d) and int32 meta (the expert id local to rank d or -1, the weight's
  bits). mori routes tokens: `dispatch(input[T,D], weights[T,K] fp32, scales[T,S], indices[T,K] int32)`
  sends each token once to every rank that owns one of its K experts (expert e on rank
  e // num_experts_per_rank) and the receiver gets a compact list of tokens in an order of its own,
  their count `total_recv` on the device. Without a host synchronisation the start derives:
      dest[t,k] = the rank whose slab has id >= 0 in slot k        (int32; a slot on no rank: the
                                                                    token's first real destination)
      lid[t,k]  = that local id (-1 for a slot on no rank), w[t,k] = its weight
      x[t]      = row t of the slab of the token's first real destination (a copy)
  and gives mori ranks as experts: num_experts_per_rank=1, indices=dest, and the local ids as the
  token's "scales" (scale_dim=K, scale_type_size=4: int32 riding beside the token). The receiver
  keeps slot k of a received token when out_indices[i,k] is this rank, with the local id from its
  scales and the weight from out_weights. mori's combine takes the expert outputs in the receive
  order and sums, for each of this rank's tokens, the rows of the ranks it went to, unweighted (the
  experts applied the weights), as the slab backends' sum over the W returned slabs does.

Layout this backend produces (LAYOUT = "compact"; the all-to-all backends produce "slab")
  dispatch_wait -> recv_x [W*T, D], recv_meta [W*T, 2K]: rows i < total_recv are the received
      tokens in mori's order, rows after are zero with ids -1 (the first W*T rows of mori's
      receive buffer hold them all: a rank receives at most T tokens from each rank). Slab s is NOT
      "what rank s sent".
  combine_wait  -> [W*T, D]: slab 0 holds the reduced tokens, the other slabs are zero.
  Same shapes and dtypes as the ops' fakes, and both layouts mean the same to the only consumers the
  models emit: tbo::moe_experts is row-wise and skips ids < 0, and the model sums the W slabs of the
  combine. So the plan records nothing new: a plan holds the ops, their shapes and the comm
  annotations (kind, bytes), the comm backend is chosen when the plan is loaded, and one plan runs
  on gloo, NCCL or mori alike. An op that read received rows by source rank would need the slab
  layout and would have to say so in the plan; none does.
"""
from __future__ import annotations

import collections
import importlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tbo_compiler.ops.errors import RuntimeFailure, one_line
from tbo_compiler.ops.kernels import unpack_meta
from tbo_compiler.runtime.comm.select import make_backend, native_backend_name
from tbo_compiler.runtime.env import flag

log = logging.getLogger(__name__)

NAME = "mori"
LAYOUT = "compact"
SPLIT_PHASE_KERNELS = ("AsyncLL",)   # kernel types with dispatch_recv / combine_recv


def _kernel_name() -> str:
    return flag("TBO_MORI_KERNEL")


def _mori():
    mod = importlib.import_module("mori")
    importlib.import_module("mori.ops")
    importlib.import_module("mori.shmem")
    return mod


# Step 1: the probe (the selector, select.py, falls back to the group's native backend without mori)

_PROBE: list[tuple[bool, str]] = []


def probe() -> tuple[bool, str]:
    """(mori imports, why not), tried once per process."""
    if not _PROBE:
        try:
            _mori()
            _PROBE.append((True, ""))
        except Exception as e:  # noqa: BLE001 - a missing package or .so (OSError) is a fallback
            _PROBE.append((False, one_line(f"{type(e).__name__}: {e}")))
    return _PROBE[0]


# Step 2: shmem and the per-group state --------------------------------------------------------

_SHMEM: dict[str, Any] = {}


def _init_shmem(group) -> None:
    if not flag("TBO_MORI_SHMEM_INIT"):
        return
    if _SHMEM:
        if _SHMEM["pg"] is not group.pg:
            raise RuntimeFailure(f"mori shmem is initialised for group {_SHMEM['group']!r}; group "
                                 f"{group.name!r} has another process group (one per process)")
        return
    name = f"tbo_{group.name}"
    torch._C._distributed_c10d._register_process_group(name, group.pg)
    _mori().shmem.shmem_torch_process_group_init(name)
    _SHMEM.update(group=group.name, name=name, pg=group.pg)


@dataclass
class _Exchange:
    """One dispatch and its combine, on one op."""
    seq: int
    slot: int
    op: Any
    tokens: int
    dest: Tensor          # int32 [T, K]: what dispatch got, what combine must get again
    keep: tuple           # tensors mori's kernels read until the exchange ends
    recv: tuple = ()      # dispatch's outputs (views of the op's buffers)
    stage: str = "sent"   # sent -> received -> combining -> (free)


@dataclass
class _GroupState:
    pg: Any
    ops: dict = field(default_factory=dict)          # (slot, capacity, D, K, dtype, kernel) -> op
    slots: list = field(default_factory=lambda: [None, None])
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    seq: itertools.count = field(default_factory=itertools.count)


_STATES: dict[str, _GroupState] = {}


def _state(group) -> _GroupState:
    st = _STATES.get(group.name)
    if st is None or st.pg is not group.pg:  # a group registered again with a new process group
        st = _STATES[group.name] = _GroupState(group.pg)
    return st


def finalize() -> None:
    """Drop every op and finalise mori's shmem (before the process group is destroyed)."""
    _STATES.clear()
    if _SHMEM:
        _mori().shmem.shmem_finalize()
        torch._C._distributed_c10d._unregister_process_group(_SHMEM["name"])
        _SHMEM.clear()


# Step 3: the slab <-> token conversions (pure tensor code, no host synchronisation) -------------

def mori_inputs(send_x: Tensor, send_meta: Tensor, world: int, rank: int):
    """dispatch_pack's slabs -> mori's per-token inputs: (x [T,D], weights fp32 [T,K],
    local ids int32 [T,K] (the scales), destination ranks int32 [T,K] (the indices))."""
    R, D = send_x.shape
    T, K = R // world, send_meta.shape[1] // 2
    lid_all, w_all = unpack_meta(send_meta, K)
    lid_all, w_all = lid_all.reshape(world, T, K), w_all.reshape(world, T, K)
    mine = lid_all >= 0                                                  # [W, T, K]
    valid = mine.any(0)                                                  # [T, K]
    dest = mine.to(torch.int32).argmax(0)                                # the one rank with the slot
    lid = torch.where(valid, torch.where(mine, lid_all, 0).sum(0), -1).to(torch.int32)
    w = torch.where(mine, w_all, 0.0).sum(0)                             # one term: exact
    first = valid.to(torch.int32).argmax(1, keepdim=True)                # first real slot (0 if none)
    home = torch.where(valid.any(1), dest.gather(1, first).squeeze(1), rank)
    dest = torch.where(valid, dest, home.unsqueeze(1)).to(torch.int32)
    x = send_x.reshape(world, T, D)[home, torch.arange(T, device=send_x.device)]
    return x, w.contiguous(), lid.contiguous(), dest.contiguous()


def received_slabs(out: Tensor, out_weights: Tensor, out_lid: Tensor, out_dest: Tensor, total: Tensor,
                   rows: int, rank: int) -> tuple[Tensor, Tensor]:
    """mori's receive buffers (rows < total_recv valid, the rest stale) -> (recv_x [rows, D],
    recv_meta [rows, 2K] int32) in the compact layout."""
    live = (torch.arange(rows, device=out.device) < total.to(out.device)).unsqueeze(1)
    x = torch.where(live, out[:rows], 0)
    here = live & (out_dest[:rows] == rank)
    ids = torch.where(here, out_lid[:rows].view(torch.int32), -1).to(torch.int32)
    w = torch.where(here, out_weights[:rows].float(), 0.0)
    return x, torch.cat([ids, w.view(torch.int32)], dim=1)


# Step 4: the backend --------------------------------------------------------------------------

class _DispatchWait:
    def __init__(self, backend: "MoriBackend", ex: _Exchange):
        self.b, self.ex = backend, ex

    def wait(self):
        ex, b = self.ex, self.b
        if b.split:
            ex.op.dispatch_recv()
        out, out_w, out_s, out_i, total = ex.recv
        res = received_slabs(out, out_w, out_s, out_i, total, b.W * ex.tokens, b.rank)
        ex.stage = "received"
        return res


class _CombineWait:
    def __init__(self, backend: "MoriBackend", ex: _Exchange, result: tuple):
        self.b, self.ex, self.result = backend, ex, result

    def wait(self):
        ex, b = self.ex, self.b
        if b.split:
            ex.op.combine_recv()
        out = self.result[0]
        T = ex.tokens
        parts = torch.cat([out[:T], out.new_zeros((b.W - 1) * T, out.shape[1])])  # copied out of mori's buffer
        ex.op.reset()
        b.state.slots[ex.slot] = None
        return parts


class MoriBackend:
    name = NAME
    layout = LAYOUT

    def __init__(self, group):
        self.group, self.pg, self.W, self.rank = group, group.pg, group.world, group.rank
        self.kernel = _kernel_name()
        kinds = _mori().ops.EpDispatchCombineKernelType
        if not hasattr(kinds, self.kernel):
            raise RuntimeFailure(f"TBO_MORI_KERNEL={self.kernel!r} is not a mori kernel type "
                                 "(AsyncLL: split phase; IntraNode, InterNodeV1, ...)")
        self.split = self.kernel in SPLIT_PHASE_KERNELS
        _init_shmem(group)
        self.state = _state(group)
        self.other = make_backend(native_backend_name(group.pg), group)  # the collectives mori lacks

    # -- ops
    def _op(self, slot: int, T: int, D: int, K: int, dtype: torch.dtype):
        cap = max(T, flag("TBO_MORI_MAX_TOKENS"), 1)
        key = (slot, cap, D, K, dtype, self.kernel)
        op = self.state.ops.get(key)
        if op is None:
            m = _mori()
            cfg = m.ops.EpDispatchCombineConfig(
                data_type=dtype, rank=self.rank, world_size=self.W, hidden_dim=D,
                scale_dim=K, scale_type_size=4, max_token_type_size=torch.empty(0, dtype=dtype).element_size(),
                max_num_inp_token_per_rank=cap, num_experts_per_rank=1, num_experts_per_token=K,
                kernel_type=getattr(m.ops.EpDispatchCombineKernelType, self.kernel),
                gpu_per_node=min(self.W, flag("TBO_MORI_GPUS_PER_NODE")))
            op = self.state.ops[key] = m.ops.EpDispatchCombineOp(cfg)
            log.info("mori: op %d of group %s for %d tokens per rank (hidden %d, top-%d, %s, %s)",
                     slot, self.group.name, cap, D, K, str(dtype).removeprefix("torch."), self.kernel)
        return op

    def ops(self) -> list:
        return list(self.state.ops.values())

    # -- dispatch / combine
    def dispatch(self, send_x: Tensor, send_meta: Tensor):
        st = self.state
        slot = next((s for s in (0, 1) if st.slots[s] is None), None)
        if slot is None:
            raise RuntimeFailure(f"mori (group {self.group.name}): a third dispatch while both ops hold an "
                                 "exchange; each ubatch's combine must finish before its next dispatch")
        T = send_x.shape[0] // self.W
        x, w, lid, dest = mori_inputs(send_x, send_meta, self.W, self.rank)
        op = self._op(slot, T, send_x.shape[1], dest.shape[1], send_x.dtype)
        send = op.dispatch_send if self.split else op.dispatch
        recv = send(input=x, weights=w, scales=lid, indices=dest)
        ex = _Exchange(next(st.seq), slot, op, T, dest, (x, w, lid, dest), tuple(recv))
        st.slots[slot] = ex
        st.history.append(("dispatch", slot, T))
        return _DispatchWait(self, ex)

    def combine(self, y: Tensor):
        st = self.state
        ready = sorted((e for e in st.slots if e is not None and e.stage == "received"), key=lambda e: e.seq)
        if not ready:
            raise RuntimeFailure(f"mori (group {self.group.name}): a combine with no received dispatch")
        ex = ready[0]
        if y.shape[0] != self.W * ex.tokens:
            raise RuntimeFailure(f"mori (group {self.group.name}): combine of {y.shape[0]} rows, but the "
                                 f"oldest received dispatch holds {self.W * ex.tokens} (combines out of order?)")
        y = y.contiguous()
        send = ex.op.combine_send if self.split else ex.op.combine
        result = send(input=y, weights=None, indices=ex.dest)
        ex.stage, ex.keep = "combining", ex.keep + (y,)
        st.history.append(("combine", ex.slot, ex.tokens))
        return _CombineWait(self, ex, tuple(result))

    # -- the other collectives
    def all_gather(self, x):
        return self.other.all_gather(x)

    def reduce_scatter(self, x):
        return self.other.reduce_scatter(x)

    def all_reduce(self, x):
        return self.other.all_reduce(x)


BACKEND = MoriBackend

__all__ = ["MoriBackend", "BACKEND", "probe", "finalize", "mori_inputs", "received_slabs", "LAYOUT"]
