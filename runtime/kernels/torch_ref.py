"""The torch reference of every kernel op: any device, the semantics the other backends match.

No host synchronisation on CUDA (no `.item()`, no data-dependent shapes), so a program that falls
back to these is still capturable in a CUDA graph. On CPU `moe_experts` runs only the routed rows
(data-dependent, fine there); on CUDA it runs every local expert on every row, masked.

Legend as in ops/kernels.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "torch"
_CHUNK = 64  # tokens per chunk in the attention reference (bounds the gathered [chunk, S, ...] tensor)


def available() -> bool:
    return True


def supports(op: str, args: tuple) -> bool:
    return True


# Step 1: attention over a paged cache ---------------------------------------------------------

def _context_slots(block_table: Tensor, positions: Tensor, block_size: int, window: int = 0):
    """Slots [t, S] of each token's request (the block table's full width: a bound from shapes,
    not from the data), and a mask of the ones it may attend to (the last `window` positions
    only, when window > 0)."""
    bt = block_table.long()
    offs = torch.arange(block_size, device=bt.device)
    slots = (bt.unsqueeze(-1) * block_size + offs).reshape(bt.shape[0], -1)
    logical = torch.arange(slots.shape[1], device=bt.device).unsqueeze(0)
    mask = logical <= positions.unsqueeze(1)
    if window > 0:
        mask &= logical > positions.unsqueeze(1) - window
    return slots, mask


def paged_attention(q, kv_cache, block_table, positions, block_size, scale, sinks=None, window=0):
    T, H, Dh = q.shape
    G = kv_cache.shape[2]
    out = torch.empty_like(q)
    for c in range(0, T, _CHUNK):
        sl = slice(c, c + _CHUNK)
        slots, mask = _context_slots(block_table[sl], positions[sl], block_size, window)
        kv = kv_cache[slots].float()                                # [t,S,2,G,Dh]
        k, v = kv[:, :, 0], kv[:, :, 1]
        qg = q[sl].float().view(-1, G, H // G, Dh)                  # [t,G,r,Dh]
        s = torch.einsum("tgrd,tsgd->tgrs", qg, k) * scale
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        if sinks is None:
            p = s.softmax(-1)
        else:  # the sink is one more logit in the softmax, with no value: its share is dropped
            sink = sinks.float().view(1, G, H // G, 1).expand(*s.shape[:3], 1)
            p = torch.cat([s, sink], -1).softmax(-1)[..., :-1]
        o = torch.einsum("tgrs,tsgd->tgrd", p, v)
        out[sl] = o.reshape(-1, H, Dh).to(q.dtype)
    return out


def latent_attention(q_lat, q_pe, cache, block_table, positions, block_size, scale):
    q, v_dim = torch.cat([q_lat, q_pe], dim=-1), q_lat.shape[-1]
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


# Step 2: routed experts ------------------------------------------------------------------------

def glu_activation(gate: Tensor, up: Tensor, activation: str = "silu", limit: float = 0.0) -> Tensor:
    """The experts' activation (ops/kernels.py): silu(g) * u, or GPT-OSS's (u + 1) * g * sigmoid(1.702 g);
    limit > 0 clamps g from above and u on both sides first."""
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gpt_oss":
        return (up + 1) * (gate * torch.sigmoid(1.702 * gate))
    raise ValueError(f"unknown expert activation {activation!r}")


def _expert(x, w13_e, w2_e, b13_e=None, b2_e=None, activation="silu", limit=0.0):
    gate, up = F.linear(x, w13_e, b13_e).chunk(2, dim=-1)
    return F.linear(glu_activation(gate, up, activation, limit), w2_e, b2_e)


def moe_experts(x, topk_ids, topk_w, w13, w2, w13_bias=None, w2_bias=None, activation="silu", limit=0.0):
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)

    def expert(rows_x, e):
        return _expert(rows_x, w13[e], w2[e], None if w13_bias is None else w13_bias[e],
                       None if w2_bias is None else w2_bias[e], activation, limit)

    if x.is_cuda:  # sync-free: every local expert on every row, weighted by its (masked) gate
        for e in range(w13.shape[0]):
            w_e = torch.where(topk_ids == e, topk_w.float(), 0.0).sum(-1, keepdim=True)
            out += expert(x, e).float() * w_e
        return out.to(x.dtype)
    valid = topk_ids >= 0
    for e in torch.unique(topk_ids[valid]).tolist():
        rows, slot = (topk_ids == e).nonzero(as_tuple=True)
        y = expert(x[rows], e)
        out.index_add_(0, rows, y.float() * topk_w[rows, slot].float().unsqueeze(-1))
    return out.to(x.dtype)


# Step 3: norms, activation, rotary embedding ---------------------------------------------------

def rms_norm(x, weight, eps):
    xf = x.float()  # statistics in fp32 whatever the activation dtype
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x, residual, weight, eps):
    h = x + residual
    return rms_norm(h, weight, eps), h


def silu_mul(gu):
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_interleaved(x, positions, inv_freq, mul):
    ang = positions.float()[:, None] * inv_freq[None, :]                      # [T, R/2]
    ang = ang.view(ang.shape[0], *([1] * (x.dim() - 2)), ang.shape[1])
    cos, sin = torch.cos(ang) * mul, torch.sin(ang) * mul
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).to(x.dtype)


def rope_half(x, positions, inv_freq):
    ang = (positions.float()[:, None] * inv_freq[None, :]).unsqueeze(1)      # [T, 1, D/2]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def qk_rope_kv(q, k, v, positions, inv_freq, q_weight=None, k_weight=None, eps=0.0):
    """The attention's pre-cache work as the ops it stands for (so: the same bits by construction)."""
    if q_weight is not None:
        q = rms_norm(q, q_weight, eps)
    if k_weight is not None:
        k = rms_norm(k, k_weight, eps)
    return rope_half(q, positions, inv_freq), torch.stack([rope_half(k, positions, inv_freq), v], 1)


# Step 4: token layout for dispatch -------------------------------------------------------------

def dispatch_pack(x, topk_ids, topk_w, world, experts_per_rank):
    T, K = topk_ids.shape
    dest = torch.arange(world, device=topk_ids.device).view(world, 1, 1)
    mine = (topk_ids // experts_per_rank).unsqueeze(0) == dest               # [W,T,K]
    local = torch.where(mine, topk_ids.unsqueeze(0) - dest * experts_per_rank, -1).to(torch.int32)
    w = torch.where(mine, topk_w.unsqueeze(0).float(), 0.0)
    send_x = torch.where(mine.any(-1, keepdim=True), x.unsqueeze(0), torch.zeros((), dtype=x.dtype,
                                                                                device=x.device))
    meta = torch.cat([local, w.view(torch.int32)], dim=-1)
    return send_x.reshape(world * T, x.shape[1]), meta.reshape(world * T, 2 * K)


def linear_f32(x, weight, bias=None):
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def route_topk(logits, k, scoring="softmax", renormalize=False):
    if scoring == "softmax":
        w, ids = logits.softmax(-1).topk(k, dim=-1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        return ids, w
    if scoring == "topk_softmax":
        top, ids = logits.topk(k, dim=-1)
        return ids, top.softmax(-1)
    raise ValueError(f"route_topk: unknown scoring {scoring!r}")


IMPLS = {"paged_attention": paged_attention, "latent_attention": latent_attention,
         "moe_experts": moe_experts, "rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "silu_mul": silu_mul,
         "rope_interleaved": rope_interleaved, "rope_half": rope_half, "qk_rope_kv": qk_rope_kv,
         "dispatch_pack": dispatch_pack, "linear_f32": linear_f32, "route_topk": route_topk}
