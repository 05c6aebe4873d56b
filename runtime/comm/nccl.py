"""NCCL, stream-ordered and capturable in a CUDA graph.

Each collective is issued synchronously (`async_op=False`) on the *current* stream, which the
program has set to its comm stream: when the call returns, the comm stream is ordered after the
collective, and the program's events carry that order to the compute stream. No work handle or
other Python state outlives the call, so a CUDA graph replay (which skips Python) does exactly what
the captured call did. Packing and unpacking are compute ops elsewhere: the comm stream carries
only the collectives."""
from __future__ import annotations

import torch.distributed as dist

from tbo_compiler.runtime.comm.local import Done
from tbo_compiler.runtime.comm.torch_dist import all_gather_into, reduce_scatter_into

NAME = "nccl"


class NcclBackend:
    name = NAME

    def __init__(self, group):
        self.group, self.pg, self.W = group, group.pg, group.world

    def _a2a(self, send):
        send = send.contiguous()
        recv = send.new_empty(send.shape)
        if send.numel():  # every rank has the same shape, so all skip together
            dist.all_to_all_single(recv, send, group=self.pg)
        return recv

    def dispatch(self, send_x, send_meta):
        return Done((self._a2a(send_x), self._a2a(send_meta)))

    def combine(self, y):
        return Done(self._a2a(y))

    def all_gather(self, x):
        out = x.new_empty(self.W * x.shape[0], *x.shape[1:])
        if x.numel():
            all_gather_into(out, x.contiguous(), group=self.pg)
        return Done(out)

    def reduce_scatter(self, x):
        out = x.new_empty(x.shape[0] // self.W, *x.shape[1:])
        if x.numel():
            reduce_scatter_into(out, x.contiguous(), group=self.pg)
        return Done(out)

    def all_reduce(self, x):
        out = x.clone()
        if x.numel():
            dist.all_reduce(out, group=self.pg)
        return Done(out)


def probe() -> tuple[bool, str]:
    return True, ""


BACKEND = NcclBackend
