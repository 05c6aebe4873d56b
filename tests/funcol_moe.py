"""A small MoE written with only torch and torch.distributed._functional_collectives (no tbo ops):
DP attention style, tokens all_gathered before the experts and reduce_scattered after.
Importable by spawned ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


class FuncolMoE(nn.Module):
    def __init__(self, world: int, rank: int, dim=16, experts=4, layers=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.world, self.e_loc, self.lo = world, experts // world, rank * (experts // world)
        self.layers = layers
        self.norm = nn.ParameterList([nn.Parameter(torch.ones(dim)) for _ in range(layers)])
        self.gate = nn.ParameterList([nn.Parameter(torch.randn(experts, dim, generator=g) * 0.3) for _ in range(layers)])
        w1 = torch.randn(layers, experts, 2 * dim, dim, generator=g) * 0.2
        w2 = torch.randn(layers, experts, dim, 2 * dim, generator=g) * 0.2
        sl = slice(self.lo, self.lo + self.e_loc)  # this rank's experts
        self.w1, self.w2 = nn.Parameter(w1[:, sl].clone()), nn.Parameter(w2[:, sl].clone())

    def forward(self, x):
        group = dist.group.WORLD
        for l in range(self.layers):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm[l]
            g = funcol.all_gather_tensor(h, 0, group)                     # [W*T, D]
            w, ids = (g @ self.gate[l].t()).softmax(-1).topk(2, dim=-1)
            y = torch.zeros_like(g)
            for e in range(self.e_loc):
                we = (w * (ids == self.lo + e)).sum(-1, keepdim=True)
                y = y + we * (torch.relu(g @ self.w1[l, e].t()) @ self.w2[l, e].t())
            x = x + funcol.reduce_scatter_tensor(y, "sum", 0, group)      # [T, D]
        return x


def rank_check(rank, world, T):
    torch.manual_seed(100 + rank)
    m = FuncolMoE(world, rank)
    x = torch.randn(T, 16)
    seen = []
    with torch.no_grad():
        ref = m(x)
        torch._dynamo.reset()
        out = torch.compile(m, backend="tbo", dynamic=False, fullgraph=True,
                            options={"on_compile": seen.append})(x)
    (c,) = seen
    kinds = sorted(op.kind for op in c.comm.ops)
    return float((out - ref).abs().max()), float(ref.abs().max()), c.cut, kinds
