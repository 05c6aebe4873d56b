"""aiter kernels (ROCm) as one backend: MLA over the paged latent cache, fused MoE.

    latent_attention  aiter.mla.mla_decode_fwd   split-KV decode kernel (any T; the default)
                      aiter.mla.mla_prefill_fwd  when T >= PREFILL_TOKENS, bf16, 16 or 128 heads
    moe_experts       aiter.fused_moe.fused_moe  SwiGLU experts without biases, `expert_mask` for EP

Untested on hardware (no AMD GPU here): written against aiter's documented Python API and tested
on CPU with a fake `aiter` (tests/fakes/aiter) that checks every argument and computes with the
torch reference. Probe: `import aiter` (a missing package or .so raises, and the selector falls
back with one log line). The selector lists aiter first only on ROCm builds of torch
(`torch.version.hip`); elsewhere only TBO_KERNELS / `prefer()` reach it, and then, off ROCm, it
takes tensors of any device and dtype (a stand-in aiter: the tests). On ROCm `supports` asks
for HIP tensors in the dtypes and head sizes the kernels take.

Step 1: the engine-style batch as aiter's paged batch (no host synchronisation)
  The op's batch is per token: row t attends to the slots of its request (its block-table row)
  at logical positions <= positions[t]. aiter wants requests as CSR: qo_indptr (query rows),
  kv_indptr / kv_indices (the kv pages of each request, concatenated), kv_last_page_lens. Every
  token becomes one aiter request of one query row:
      qo_indptr          = 0, 1, ..., T                          (max_seqlen_q = 1)
      kv length of t     L_t = min(positions[t] + 1, S)          (the causal mask, exactly)
      pages              one slot each (page_size 1: the cache [N, C] is viewed as [N, 1, 1, C])
      kv_indptr          = 0, cumsum(L)
      kv_indices[kv_indptr[t] + j] = block_table[t, j // BS] * BS + j % BS,   j < L_t
      kv_last_page_lens  = 1
  kv_indices is one scatter into a buffer of static length T * NB * BS (the block table's width in
  slots, a bound from shapes); its tail past kv_indptr[T] is never read. So every shape is a
  function of T and the block table's width, nothing waits for the device, and a bucket stays
  capturable in a graph. Why one request per token: grouping tokens into real requests needs their
  count and longest query on the host (aiter's batch size and max_seqlen_q); and aiter's prefill
  kernel is not causal, so one query row per request is also what keeps its mask exact.
  Page size 1 is what the MI300/MI355 MLA kernels take; the price is an index of T * S int32.
Step 2: MLA: q = [q_lat | q_pe] as one [T, H, C] tensor (aiter reads one query), o [T, H, V]
  written by the kernel, sm_scale = the op's scale (yarn's mscale included).
Step 3: fused MoE: ids < 0 (not this rank's) become id E, an expert that `expert_mask`
  (int32 [E + 1]: ones, then 0) marks as not local, so aiter's sort drops those pairs; the rank's
  experts keep their ids (aiter numbers local experts by the mask's prefix sum). Weights of
  dropped pairs are zeroed too. Gate and up are w13's halves (aiter's separated gate mode).
  Routing (grouped / biased top-k) is the model's, before the op: nothing here to fuse it into.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tbo_compiler.ops.errors import RuntimeFailure
from tbo_compiler.runtime.env import flag

NAME = "aiter"


#: T from which latent_attention uses aiter's prefill kernel (bf16, 16 or 128 heads only)
PREFILL_TOKENS = flag("TBO_AITER_MLA_PREFILL_TOKENS")
_PREFILL_HEADS = (16, 128)
_MLA_DTYPES = (torch.bfloat16,)
_MOE_DTYPES = (torch.bfloat16, torch.float16)


def _aiter():
    import aiter
    import aiter.fused_moe
    import aiter.mla  # noqa: F401  (the submodules this backend calls)
    return aiter


def _on_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def available() -> bool:
    _aiter()  # the probe: raises (ImportError, OSError from a .so) when aiter cannot load
    return torch.cuda.is_available() if _on_rocm() else True


def _plain_experts(extra: tuple) -> bool:
    """moe_experts' optional arguments (biases, activation, limit) at their defaults: SwiGLU only."""
    defaults = (None, None, "silu", 0.0)
    return all(a is None if d is None else a == d for a, d in zip(extra, defaults))


def supports(op: str, args: tuple) -> bool:
    rocm = _on_rocm()  # off ROCm (forced): a stand-in aiter, any device and dtype
    if op == "latent_attention" and len(args) == 7:
        q_lat, q_pe, cache = args[:3]
        return not rocm or (q_lat.is_cuda and q_lat.dtype in _MLA_DTYPES and cache.dtype == q_lat.dtype
                            and q_lat.shape[-1] == 512 and q_pe.shape[-1] == 64)
    if op == "moe_experts" and _plain_experts(args[5:]):
        x, w13, w2 = args[0], args[3], args[4]
        return not rocm or (x.is_cuda and x.dtype in _MOE_DTYPES and w13.dtype == x.dtype == w2.dtype)
    return False


# Step 1 --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PagedBatch:
    """aiter's view of a per-token batch: one request per token, pages of one slot."""
    qo_indptr: Tensor          # int32 [T + 1]
    kv_indptr: Tensor          # int32 [T + 1]
    kv_indices: Tensor         # int32 [T * S]; entries past kv_indptr[T] unused
    kv_last_page_lens: Tensor  # int32 [T]
    max_seqlen_q: int = 1
    page_size: int = 1


def paged_batch(block_table: Tensor, positions: Tensor, block_size: int) -> PagedBatch:
    T, NB = block_table.shape
    S = NB * block_size
    dev, i32 = block_table.device, torch.int32
    kv_len = (positions.to(i32) + 1).clamp(max=S)  # what the reference sees: its whole table at most
    kv_indptr = torch.zeros(T + 1, dtype=i32, device=dev)
    kv_indptr[1:] = torch.cumsum(kv_len, 0, dtype=i32)
    j = torch.arange(S, dtype=i32, device=dev)
    slots = block_table.to(i32)[:, (j // block_size).long()] * block_size + j % block_size   # [T, S]
    dest = torch.where(j < kv_len.unsqueeze(1), kv_indptr[:-1].unsqueeze(1) + j, T * S)    # T*S: a dump slot
    kv_indices = torch.zeros(T * S + 1, dtype=i32, device=dev)
    kv_indices.scatter_(0, dest.reshape(-1).long(), slots.reshape(-1))
    return PagedBatch(qo_indptr=torch.arange(T + 1, dtype=i32, device=dev), kv_indptr=kv_indptr,
                      kv_indices=kv_indices[: T * S],
                      kv_last_page_lens=torch.ones(T, dtype=i32, device=dev))


# Step 2 --------------------------------------------------------------------------------------

def _use_prefill(q: Tensor) -> bool:
    T, H, _ = q.shape
    return T >= PREFILL_TOKENS and q.dtype == torch.bfloat16 and H in _PREFILL_HEADS


def latent_attention(q_lat, q_pe, cache, block_table, positions, block_size, scale):
    T, H, V = q_lat.shape
    o = q_lat.new_empty(T, H, V)
    if T == 0:
        return o
    mla = _aiter().mla
    q = torch.cat([q_lat, q_pe], dim=-1)
    b = paged_batch(block_table, positions, block_size)
    kv_buffer = cache.view(-1, b.page_size, 1, cache.shape[-1])
    common = dict(q=q, kv_buffer=kv_buffer, o=o, qo_indptr=b.qo_indptr, kv_indptr=b.kv_indptr,
                  kv_indices=b.kv_indices, kv_last_page_lens=b.kv_last_page_lens,
                  max_seqlen_q=b.max_seqlen_q, sm_scale=float(scale))
    if _use_prefill(q):
        mla.mla_prefill_fwd(**common)
    else:
        mla.mla_decode_fwd(**common, page_size=b.page_size, nhead_kv=1)
    return o


# Step 3 --------------------------------------------------------------------------------------

_MASKS: dict[tuple, Tensor] = {}


def expert_mask(num_local: int, device) -> Tensor:
    """int32 [E + 1]: the rank's E experts, then the id that stands for "another rank's"."""
    key = (num_local, str(device))
    if key not in _MASKS:
        m = torch.ones(num_local + 1, dtype=torch.int32, device=device)
        m[num_local] = 0
        _MASKS[key] = m
    return _MASKS[key]


def moe_inputs(topk_ids: Tensor, topk_w: Tensor, num_local: int) -> tuple[Tensor, Tensor]:
    """(topk_ids int32 with -1 -> E, topk_weight fp32 zero there)."""
    here = topk_ids >= 0
    ids = torch.where(here, topk_ids, num_local).to(torch.int32)
    return ids, torch.where(here, topk_w.float(), 0.0)


def moe_experts(x, topk_ids, topk_w, w13, w2, *extra):
    if not _plain_experts(extra):  # supports() keeps these calls away; a direct call is refused
        raise RuntimeFailure("aiter backend: moe_experts with expert biases or another activation")
    if x.shape[0] == 0:
        return torch.empty_like(x)
    a = _aiter()
    E = w13.shape[0]
    ids, w = moe_inputs(topk_ids, topk_w, E)
    return a.fused_moe.fused_moe(hidden_states=x, w1=w13, w2=w2, topk_weight=w, topk_ids=ids,
                                 expert_mask=expert_mask(E, x.device), activation=a.ActivationType.Silu,
                                 quant_type=a.QuantType.No)


IMPLS = {"latent_attention": latent_attention, "moe_experts": moe_experts}
