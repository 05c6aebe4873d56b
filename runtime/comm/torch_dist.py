"""torch.distributed with async work handles: gloo on CPU (the multi-process tests), and any
process group in eager use. The start issues the collective asynchronously; the wait waits on the
work and returns the result. Not for CUDA graphs (the work objects are Python state).

Every wait is bounded by the runtime's timeout (TBO_COMM_TIMEOUT_S): a peer that died or hangs
fails it with a PeerFailure naming the peer (faults.py). On gloo the collective carries the timeout
in its c10d options too, so gloo's worker thread gives up as well instead of blocking the process's
exit for the group's 30 minutes."""
from __future__ import annotations

import time

import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

from tbo_compiler.runtime.comm.faults import peer_failure, timed_opts, wait_works
from tbo_compiler.runtime.comm.local import Done
from tbo_compiler.runtime.env import comm_timeout_s

NAME = "torch_dist"


def all_gather_into(out, inp, **kw):
    # torch 2.13 renames these (the old names warn); the GPU image's 2.11 has only the old ones
    return getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, inp, **kw)


def reduce_scatter_into(out, inp, **kw):
    return getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(out, inp, **kw)


def _method(pg, new: str, old: str):
    """A ProcessGroup method under its torch 2.13 name, or its older one (torch 2.11)."""
    return getattr(pg, new, None) or getattr(pg, old)


class Pending:
    def __init__(self, backend, kind, works, finish):
        self.backend, self.kind, self.works, self.finish = backend, kind, works, finish
        self.started = time.monotonic()

    def wait(self):
        b = self.backend
        wait_works(self.works, b.group, self.kind, self.started, b.timeout_s)
        return self.finish()


class TorchDistBackend:
    name = NAME

    def __init__(self, group):
        self.group, self.pg, self.W = group, group.pg, group.world
        self.gloo = "gloo" in str(dist.get_backend(self.pg))
        comm_timeout_s()  # a bad value fails here, not at the first collective

    @property
    def timeout_s(self) -> float:
        return comm_timeout_s()  # read per collective: an engine may tighten it after warm-up

    def _issue(self, kind, method, *args, opts_cls, **fields):
        started = time.monotonic()
        try:
            return method(*args, timed_opts(opts_cls, self.timeout_s if self.gloo else None, **fields))
        except Exception as e:  # noqa: BLE001 - a peer that is already gone can fail the issue itself
            raise peer_failure(self.group, f"collective '{kind}'", time.monotonic() - started, self.timeout_s, e) from e

    def _a2a(self, kind, send):
        recv = send.new_empty(send.shape)
        if send.numel() == 0:  # every rank has the same shape, so all skip together
            return recv, []
        a2a = _method(self.pg, "all_to_all_single", "alltoall_base")
        return recv, [self._issue(kind, a2a, recv, send.contiguous(), [], [], opts_cls=c10d.AllToAllOptions)]

    def dispatch(self, send_x, send_meta):
        rx, wx = self._a2a("dispatch", send_x)
        rm, wm = self._a2a("dispatch", send_meta)
        return Pending(self, "dispatch", wx + wm, lambda: (rx, rm))

    def combine(self, y):
        recv, works = self._a2a("combine", y)
        return Pending(self, "combine", works, lambda: recv)

    def all_gather(self, x):
        out = x.new_empty(self.W * x.shape[0], *x.shape[1:])
        ag = _method(self.pg, "all_gather_single", "_allgather_base")
        works = [self._issue("all_gather", ag, out, x.contiguous(), opts_cls=c10d.AllgatherOptions)
                 ] if x.numel() else []
        return Pending(self, "all_gather", works, lambda: out)

    def reduce_scatter(self, x):
        T = x.shape[0] // self.W
        if self.gloo:  # gloo has no reduce_scatter: an all_to_all of the slabs, then a local sum
            recv, works = self._a2a("reduce_scatter", x.reshape(self.W, T, *x.shape[1:]))
            return Pending(self, "reduce_scatter", works, lambda: recv.sum(0))
        out = x.new_empty(T, *x.shape[1:])
        rs = _method(self.pg, "reduce_scatter_single", "_reduce_scatter_base")
        works = [self._issue("reduce_scatter", rs, out, x.contiguous(), opts_cls=c10d.ReduceScatterOptions,
                             reduceOp=dist.ReduceOp.SUM)] if x.numel() else []
        return Pending(self, "reduce_scatter", works, lambda: out)

    def all_reduce(self, x):
        out = x.clone()
        if x.numel() == 0:
            return Done(out)
        work = self._issue("all_reduce", self.pg.allreduce, [out], opts_cls=c10d.AllreduceOptions,
                           reduceOp=dist.ReduceOp.SUM)
        return Pending(self, "all_reduce", [work], lambda: out)


def probe() -> tuple[bool, str]:
    return True, ""


BACKEND = TorchDistBackend
