"""Routed experts as two `torch._grouped_mm` calls (CUTLASS grouped GEMM on Hopper), no host sync.

The (row, k) pairs are sorted by expert (pairs not on this rank sort last), the rows gathered in
that order, one grouped GEMM per projection over per-expert offsets, and the weighted results
added back to their rows. Rows past the last offset are never written by the grouped GEMM, so
they are selected away, never multiplied. Expert biases are added per sorted row; the activation
is the torch reference's (silu or GPT-OSS's clamped variant).
"""
from __future__ import annotations

import torch

from tbo_compiler.runtime.kernels.torch_ref import glu_activation

NAME = "grouped_mm"


def available() -> bool:
    return torch.cuda.is_available() and hasattr(torch, "_grouped_mm")


def supports(op: str, args: tuple) -> bool:
    x = args[0]
    return op == "moe_experts" and x.is_cuda and x.dtype == torch.bfloat16


def moe_experts(x, topk_ids, topk_w, w13, w2, w13_bias=None, w2_bias=None, activation="silu", limit=0.0):
    N, K = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    key = torch.where(flat >= 0, flat, E)                      # invalid pairs sort last
    order = torch.argsort(key, stable=True)
    # bincount sizes its output from the data (a host sync on CUDA); scatter_add does not
    counts = torch.zeros(E + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))[:E]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rows = order // K
    expert_of = key[order].clamp(max=E - 1)                    # the sorted pairs' experts (bias rows)
    xs = x[rows]
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    if w13_bias is not None:
        h = h + w13_bias[expert_of]
    gate, up = h.chunk(2, dim=-1)
    act = glu_activation(gate, up, activation, limit)
    y = torch._grouped_mm(act.contiguous(), w2.transpose(-2, -1), offs=offs)
    if w2_bias is not None:
        y = y + w2_bias[expert_of]
    keep = (key[order] < E).unsqueeze(-1)
    y = torch.where(keep, y.float() * topk_w.reshape(-1)[order].float().unsqueeze(-1), 0.0)
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, rows, y)
    return out.to(x.dtype)


IMPLS = {"moe_experts": moe_experts}
