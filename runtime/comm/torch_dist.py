"""torch.distributed with async work handles: gloo on CPU (the multi-process tests), and any
process group in eager use. The start issues the collective with `async_op=True`; the wait waits
on the work and returns the result. Not for CUDA graphs (the work objects are Python state)."""
from __future__ import annotations

import torch.distributed as dist

from tbo_compiler.runtime.comm.local import Done

NAME = "torch_dist"


def all_gather_into(out, inp, **kw):
    # torch 2.13 renames these (the old names warn); the GPU image's 2.11 has only the old ones
    return getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, inp, **kw)


def reduce_scatter_into(out, inp, **kw):
    return getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(out, inp, **kw)


class Pending:
    def __init__(self, works, finish):
        self.works, self.finish = works, finish

    def wait(self):
        for w in self.works:
            w.wait()
        return self.finish()


class TorchDistBackend:
    name = NAME

    def __init__(self, group):
        self.group, self.pg, self.W = group, group.pg, group.world
        self.gloo = "gloo" in str(dist.get_backend(self.pg))

    def _a2a(self, send):
        recv = send.new_empty(send.shape)
        if send.numel() == 0:  # every rank has the same shape, so all skip together
            return recv, []
        return recv, [dist.all_to_all_single(recv, send.contiguous(), group=self.pg, async_op=True)]

    def dispatch(self, send_x, send_meta):
        rx, wx = self._a2a(send_x)
        rm, wm = self._a2a(send_meta)
        return Pending(wx + wm, lambda: (rx, rm))

    def combine(self, y):
        recv, works = self._a2a(y)
        return Pending(works, lambda: recv)

    def all_gather(self, x):
        out = x.new_empty(self.W * x.shape[0], *x.shape[1:])
        works = [all_gather_into(out, x.contiguous(), group=self.pg, async_op=True)] if x.numel() else []
        return Pending(works, lambda: out)

    def reduce_scatter(self, x):
        T = x.shape[0] // self.W
        if self.gloo:  # gloo has no reduce_scatter: an all_to_all of the slabs, then a local sum
            recv, works = self._a2a(x.reshape(self.W, T, *x.shape[1:]))
            return Pending(works, lambda: recv.sum(0))
        out = x.new_empty(T, *x.shape[1:])
        works = [reduce_scatter_into(out, x.contiguous(), group=self.pg, async_op=True)] if x.numel() else []
        return Pending(works, lambda: out)

    def all_reduce(self, x):
        out = x.clone()
        if x.numel() == 0:
            return Done(out)
        return Pending([dist.all_reduce(out, group=self.pg, async_op=True)], lambda: out)
