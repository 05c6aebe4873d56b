"""Compute kernels as `tbo` custom ops, with a backend registry probed at import.

Legend: T tokens, H query heads, G kv heads, Dh head dim, C cache entry width, NB blocks per
request, BS block size, N rows (tokens as the experts see them), K experts per token, E experts
on this rank, I expert ffn width, D hidden.

The ops are row-wise in their first (token) axis: row t of every output depends only on row t of
the token-axis inputs (and on shared tensors: caches, weights). That is the rule the split pass
relies on (see passes/README.md).

  paged_attention(q_THD, kv_cache_N2GD, block_table_TNB, positions_T, block_size, scale) -> o_THD
      token t attends to the cache slots of its own request (its row of block_table) at logical
      positions <= positions[t]. The cache must already hold this step's keys/values.
  latent_attention(q_THC, cache_NC, block_table_TNB, positions_T, block_size, v_dim, scale) -> o_TH(v_dim)
      MQA over a shared latent cache (MLA's absorbed form): keys = cache[:, :C], values = cache[:, :v_dim].
  moe_experts(x_ND, topk_ids_NK, topk_w_NK, w13_E2ID, w2_EDI) -> y_ND
      sum over k of w[n,k] * expert_{ids[n,k]}(x[n]); ids < 0 contribute nothing. SwiGLU experts.

Backends: `torch` (reference, any device), `grouped_mm` (CUDA, bf16: torch._grouped_mm). A backend
that is missing falls back to the reference with one log line.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

_BACKENDS: dict[str, dict[str, Callable]] = {"paged_attention": {}, "latent_attention": {}, "moe_experts": {}}
_CHOICE: dict[str, str] = {}
_CHUNK = 64  # tokens per chunk in the reference attention (bounds the gathered [chunk, S, ...] tensor)


def register_backend(op: str, name: str, fn: Callable, *, prefer: bool = False) -> None:
    _BACKENDS[op][name] = fn
    if prefer:
        _CHOICE[op] = name


def set_backend(op: str, name: str) -> None:
    if name not in _BACKENDS[op]:
        raise ValueError(f"no backend {name!r} for {op}; have {sorted(_BACKENDS[op])}")
    _CHOICE[op] = name


def backend_for(op: str, t: Tensor) -> Callable:
    name = _CHOICE.get(op, "torch")
    fn = _BACKENDS[op].get(name)
    if fn is None:
        log.info("kernel backend %s for %s is missing; using the torch reference", name, op)
        _CHOICE[op] = name = "torch"
        fn = _BACKENDS[op]["torch"]
    return fn


# Step 1: attention over a paged cache (reference) ---------------------------------------------

def _context_slots(block_table: Tensor, positions: Tensor, block_size: int):
    """Slots [t, S] of each token's request, and a mask of the ones it may attend to."""
    nb_used = int(positions.max().item()) // block_size + 1 if positions.numel() else 1
    bt = block_table[:, :nb_used].long()
    offs = torch.arange(block_size, device=bt.device)
    slots = (bt.unsqueeze(-1) * block_size + offs).reshape(bt.shape[0], -1)
    logical = torch.arange(slots.shape[1], device=bt.device)
    return slots, logical.unsqueeze(0) <= positions.unsqueeze(1)


def _paged_attention_ref(q, kv_cache, block_table, positions, block_size, scale):
    T, H, Dh = q.shape
    G = kv_cache.shape[2]
    out = torch.empty_like(q)
    for c in range(0, T, _CHUNK):
        sl = slice(c, c + _CHUNK)
        slots, mask = _context_slots(block_table[sl], positions[sl], block_size)
        kv = kv_cache[slots].float()                                # [t,S,2,G,Dh]
        k, v = kv[:, :, 0], kv[:, :, 1]
        qg = q[sl].float().view(-1, G, H // G, Dh)                  # [t,G,r,Dh]
        s = torch.einsum("tgrd,tsgd->tgrs", qg, k) * scale
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        o = torch.einsum("tgrs,tsgd->tgrd", s.softmax(-1), v)
        out[sl] = o.reshape(-1, H, Dh).to(q.dtype)
    return out


def _latent_attention_ref(q, cache, block_table, positions, block_size, v_dim, scale):
    T, H, C = q.shape
    out = q.new_empty(T, H, v_dim)
    for c in range(0, T, _CHUNK):
        sl = slice(c, c + _CHUNK)
        slots, mask = _context_slots(block_table[sl], positions[sl], block_size)
        kv = cache[slots].float()                                   # [t,S,C]
        s = torch.einsum("thc,tsc->ths", q[sl].float(), kv) * scale
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        out[sl] = torch.einsum("ths,tsv->thv", s.softmax(-1), kv[..., :v_dim]).to(q.dtype)
    return out


# Step 2: routed experts (reference and grouped GEMM) ------------------------------------------

def _moe_experts_ref(x, topk_ids, topk_w, w13, w2):
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    valid = topk_ids >= 0
    if not bool(valid.any()):
        return out.to(x.dtype)
    for e in torch.unique(topk_ids[valid]).tolist():
        rows, slot = (topk_ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[rows], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, rows, y.float() * topk_w[rows, slot].float().unsqueeze(-1))
    return out.to(x.dtype)


def _moe_experts_grouped_mm(x, topk_ids, topk_w, w13, w2):
    """Sort (row, k) pairs by expert, one grouped GEMM per projection. No host sync."""
    N, K = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, E)                      # invalid pairs sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rows = order // K
    xs = x[rows]
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(-2, -1), offs=offs)
    keep = (key[order] < E).unsqueeze(-1)
    # rows past offs[-1] are not written by the grouped GEMM: select, never multiply, them away
    y = torch.where(keep, y.float() * topk_w.reshape(-1)[order].float().unsqueeze(-1), 0.0)
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, rows, y)
    return out.to(x.dtype)


register_backend("paged_attention", "torch", _paged_attention_ref)
register_backend("latent_attention", "torch", _latent_attention_ref)
register_backend("moe_experts", "torch", _moe_experts_ref)
register_backend("moe_experts", "grouped_mm", _moe_experts_grouped_mm)


# Step 3: the ops ----------------------------------------------------------------------------

@torch.library.custom_op("tbo::paged_attention", mutates_args=())
def paged_attention(q: Tensor, kv_cache: Tensor, block_table: Tensor, positions: Tensor,
                    block_size: int, scale: float) -> Tensor:
    return backend_for("paged_attention", q)(q, kv_cache, block_table, positions, block_size, scale)


@paged_attention.register_fake
def _(q, kv_cache, block_table, positions, block_size, scale):
    return torch.empty_like(q)


@torch.library.custom_op("tbo::latent_attention", mutates_args=())
def latent_attention(q: Tensor, cache: Tensor, block_table: Tensor, positions: Tensor,
                     block_size: int, v_dim: int, scale: float) -> Tensor:
    return backend_for("latent_attention", q)(q, cache, block_table, positions, block_size, v_dim, scale)


@latent_attention.register_fake
def _(q, cache, block_table, positions, block_size, v_dim, scale):
    return q.new_empty(q.shape[0], q.shape[1], v_dim)


@torch.library.custom_op("tbo::moe_experts", mutates_args=())
def moe_experts(x: Tensor, topk_ids: Tensor, topk_w: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    use_gmm = x.is_cuda and x.dtype == torch.bfloat16 and "grouped_mm" in _BACKENDS["moe_experts"] \
        and _CHOICE.get("moe_experts", "grouped_mm") == "grouped_mm" and hasattr(torch, "_grouped_mm")
    fn = _moe_experts_grouped_mm if use_gmm else backend_for("moe_experts", x)
    return fn(x, topk_ids, topk_w, w13, w2)


@moe_experts.register_fake
def _(x, topk_ids, topk_w, w13, w2):
    return torch.empty_like(x)


#: ops that are row-wise in the token axis of their first argument (see module docstring)
ROWWISE_OPS = {torch.ops.tbo.paged_attention.default, torch.ops.tbo.latent_attention.default,
               torch.ops.tbo.moe_experts.default}
