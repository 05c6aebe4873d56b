"""Fake `aiter.mla`: mla_decode_fwd and mla_prefill_fwd over a CSR batch of paged requests.

Contract (aiter/mla.py, csrc asm_mla.cu): q [total_s, H, C] contiguous; kv_buffer [pages,
page_size, nhead_kv=1, C]; o [total_s, H, V], V < C, written in place; qo_indptr / kv_indptr
int32 [bs + 1] (kv_indptr counts pages), kv_indices int32 page ids, kv_last_page_lens int32 [bs]
(tokens in each request's last page, 1..page_size); max_seqlen_q an int >= every request's query
length. Request b's queries are rows qo_indptr[b]..qo_indptr[b+1]-1; its keys the
(pages - 1) * page_size + last tokens of its pages; decode is causal (query i of Q attends to
keys <= L - Q + i), the prefill kernel is not (and takes bf16 only, 16 or 128 heads per kv head).
"""
from __future__ import annotations

import torch

from fakes import check
from fakes.aiter import CALLS

_DECODE_DTYPES = (torch.bfloat16, torch.float32, torch.float8_e4m3fnuz, torch.float8_e4m3fn)


def _check_batch(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                 page_size, nhead_kv, sm_scale):
    check(q.dim() == 3 and kv_buffer.dim() == 4 and o.dim() == 3,
          f"q [T,H,C], kv_buffer [pages,page_size,nhead_kv,C], o [T,H,V]; got {tuple(q.shape)}, "
          f"{tuple(kv_buffer.shape)}, {tuple(o.shape)}")
    T, H, C = q.shape
    check(q.is_contiguous(), "q must be contiguous")
    check(kv_buffer.shape[3] == C, f"kv_buffer's last dim {kv_buffer.shape[3]} != q's {C}")
    check(kv_buffer.shape[1] == page_size, f"kv_buffer pages of {kv_buffer.shape[1]} but page_size={page_size}")
    check(kv_buffer.shape[2] == nhead_kv == 1, "MLA: one kv head")
    check(tuple(o.shape[:2]) == (T, H) and o.shape[2] < C, f"o {tuple(o.shape)} for q {tuple(q.shape)}")
    check(o.dtype == q.dtype == kv_buffer.dtype, f"dtypes q {q.dtype}, kv {kv_buffer.dtype}, o {o.dtype}")
    for name, t in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices),
                    ("kv_last_page_lens", kv_last_page_lens)):
        check(isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == 1, f"{name}: int32 1-D")
        check(t.device == q.device, f"{name} on {t.device}, q on {q.device}")
    bs = qo_indptr.numel() - 1
    check(bs >= 0 and kv_indptr.numel() == bs + 1 and kv_last_page_lens.numel() == bs,
          f"bs {bs}: kv_indptr {kv_indptr.numel()}, kv_last_page_lens {kv_last_page_lens.numel()}")
    qo, kp = qo_indptr.tolist(), kv_indptr.tolist()
    check(qo[0] == 0 and qo[-1] == T and all(a <= b for a, b in zip(qo, qo[1:])), "qo_indptr: 0 .. T, sorted")
    check(kp[0] == 0 and kp[-1] <= kv_indices.numel() and all(a <= b for a, b in zip(kp, kp[1:])),
          "kv_indptr: 0 .. <= len(kv_indices), sorted")
    used = kv_indices[: kp[-1]]
    check(bool(((used >= 0) & (used < kv_buffer.shape[0])).all()), "kv_indices out of the buffer's pages")
    check(isinstance(max_seqlen_q, int) and max_seqlen_q >= max([b - a for a, b in zip(qo, qo[1:])], default=0),
          f"max_seqlen_q={max_seqlen_q!r} below a request's query length")
    check(sm_scale is None or isinstance(sm_scale, float), "sm_scale: a float")
    return qo, kp


def _attend(q, kv_buffer, o, qo, kp, kv_indices, kv_last_page_lens, page_size, scale, causal):
    """Each request's queries over its pages, with tbo-compiler's torch reference."""
    from tbo_compiler.runtime.kernels import torch_ref

    T, H, C = q.shape
    V = o.shape[2]
    last = kv_last_page_lens.tolist()
    width = max([b - a for a, b in zip(kp, kp[1:])], default=1) or 1
    tables, positions = [], []
    for b in range(len(qo) - 1):
        n_q, pages = qo[b + 1] - qo[b], kv_indices[kp[b]:kp[b + 1]].tolist()
        if n_q == 0:
            continue
        check(len(pages) > 0 and 1 <= last[b] <= page_size, f"request {b}: no pages or a bad last-page length")
        kv_len = (len(pages) - 1) * page_size + last[b]
        check(kv_len >= n_q or not causal, f"request {b}: {n_q} queries over {kv_len} keys")
        for i in range(n_q):
            tables.append(pages + [0] * (width - len(pages)))
            positions.append(kv_len - n_q + i if causal else kv_len - 1)
    bt = torch.tensor(tables, dtype=torch.int32).view(-1, width)
    pos = torch.tensor(positions, dtype=torch.int64)
    scale = scale if scale is not None else C ** -0.5
    o.copy_(torch_ref.latent_attention(q[..., :V], q[..., V:], kv_buffer.reshape(-1, C), bt, pos, page_size, scale))


def mla_decode_fwd(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                   page_size=1, nhead_kv=1, sm_scale=None, logit_cap=0.0, num_kv_splits=None,
                   num_kv_splits_indptr=None, work_meta_data=None, work_indptr=None, work_info_set=None,
                   reduce_indptr=None, reduce_final_map=None, reduce_partial_map=None, q_scale=None,
                   kv_scale=None, intra_batch_mode=False, return_logits=False, return_lse=False, causal=True):
    CALLS.append({"fn": "mla_decode_fwd", "args": dict(locals())})
    check(q.dtype in _DECODE_DTYPES, f"mla_decode_fwd: q dtype {q.dtype}")
    check(logit_cap <= 0, "logit_cap is not supported")
    qo, kp = _check_batch(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                          page_size, nhead_kv, sm_scale)
    _attend(q, kv_buffer, o, qo, kp, kv_indices, kv_last_page_lens, page_size, sm_scale, causal)
    T, H, V = o.shape
    return o.view(T, 1, H, V), torch.zeros(T, 1, H, 1)


def mla_prefill_fwd(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                    sm_scale=None, logit_cap=0.0, num_kv_splits=None):
    CALLS.append({"fn": "mla_prefill_fwd", "args": dict(locals())})
    check(q.dtype == kv_buffer.dtype == torch.bfloat16, f"mla_prefill_fwd: bf16 only, got {q.dtype}")
    check(q.dim() == 3 and q.shape[1] in (16, 128), "mla_prefill_fwd: 16 or 128 query heads per kv head")
    qo, kp = _check_batch(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                          kv_buffer.shape[1], kv_buffer.shape[2], sm_scale)
    _attend(q, kv_buffer, o, qo, kp, kv_indices, kv_last_page_lens, kv_buffer.shape[1], sm_scale, causal=False)
    T, H, V = o.shape
    return o.view(T, H, V), torch.zeros(T, 1, H, 1)
