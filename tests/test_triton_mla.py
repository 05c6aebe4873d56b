"""The Triton MLA kernel (runtime/kernels/triton_mla.py) against a float64 reference.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
any kernel module is imported), in fp32 and fp16 only: the interpreter's tl.dot is wrong on bf16
operands. bf16 and the real DeepSeek-V3 shapes run only on a GPU (marker `gpu`).
"""
from __future__ import annotations

import math

import pytest
import torch

from tbo_compiler.runtime.kernels import triton_mla
from tbo_compiler.runtime.kernels.triton_mla import supported


def latent_attention(q, cache, block_table, positions, block_size, v_dim, scale, **kw):
    """The kernel on q = [q_lat | q_pe] given as one tensor: its two parts are views, no copy."""
    return triton_mla.latent_attention(q[..., :v_dim], q[..., v_dim:], cache, block_table, positions,
                                       block_size, scale, **kw)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def gpu_only(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


TINY = dict(H=4, C=40, V=32)       # the tiny models' dims: C and V not powers of two
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


# Step 1: inputs and the reference ---------------------------------------------------------------

def make_case(ctx_lens, new_tokens, *, H, C, V, bs, dtype=torch.float32, width=None, pad=0,
              seed=0, device=DEV):
    """Requests with total context ctx_lens[i], of which the last new_tokens[i] are queries.

    Blocks are shuffled over a pool with spare blocks, so no request is contiguous. `pad` padding
    tokens (position 0, all-zero block-table row) are appended.
    """
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(L / bs) for L in ctx_lens]
    width = width or max(need)
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    rows, positions, b = [], [], 0
    for L, new, k in zip(ctx_lens, new_tokens, need):
        row = torch.zeros(width, dtype=torch.int32)
        row[:k] = perm[b:b + k].to(torch.int32)
        b += k
        rows += [row] * new
        positions += list(range(L - new, L))
    rows += [torch.zeros(width, dtype=torch.int32)] * pad
    positions += [0] * pad
    T = len(positions)
    q = torch.randn(T, H, C, generator=g)
    cache = torch.randn(num_blocks * bs, C, generator=g)
    return dict(q=q.to(device, dtype), cache=cache.to(device, dtype),
                block_table=torch.stack(rows).to(device),
                positions=torch.tensor(positions, dtype=torch.int64, device=device),
                block_size=bs, v_dim=V, scale=1.0 / math.sqrt(C))


def reference(q, cache, block_table, positions, block_size, v_dim, scale):
    """Gather each token's slots, softmax in float64."""
    out = torch.empty(q.shape[0], q.shape[1], v_dim, dtype=torch.float64, device=q.device)
    for t in range(q.shape[0]):
        j = torch.arange(int(positions[t]) + 1, device=q.device)
        slots = block_table[t, j // block_size].long() * block_size + j % block_size
        kv = cache[slots].double()
        p = (q[t].double() @ kv.T * scale).softmax(-1)
        out[t] = p @ kv[:, :v_dim]
    return out


def check(case, dtype=None, **kw):
    """Run the kernel into a NaN-poisoned buffer; every element must be written and match."""
    dtype = dtype or case["q"].dtype
    T, H, _ = case["q"].shape
    out = torch.full((T, H, case["v_dim"]), float("nan"), dtype=dtype, device=case["q"].device)
    got = latent_attention(**case, out=out, **kw)
    assert got is out and got.dtype == dtype
    assert not got.isnan().any(), "unwritten (or NaN) output elements"
    ref = reference(**case)
    err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return got


# Step 2: CPU (interpreter) and GPU: fp32 and fp16 ----------------------------------------------

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_shuffled_blocks(dtype):
    check(make_case([1, 5, 17, 33], [1, 1, 1, 1], bs=4, dtype=dtype, **TINY))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_with_cached_prefix(dtype):
    # request 0: 7 cached + 6 new (causal among the new); request 1: a fresh prefill from 0
    check(make_case([13, 9], [6, 9], bs=4, dtype=dtype, **TINY))


@pytest.mark.parametrize("bs", [2, 64])
def test_request_straddling_many_blocks(bs):
    # bs=2: a 32-key tile spans 16 blocks; bs=64: tiles lie inside one block, the table is wide
    check(make_case([70, 3], [2, 1], bs=bs, width=40, **TINY))


def test_padding_token():
    check(make_case([6, 11], [1, 2], bs=4, pad=2, **TINY))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [2, 3, 8])
def test_split_kv(dtype, splits):
    # ctx 1 and 2 leave most chunks empty (lse = -inf); 45 keys over 8 splits are 16-key chunks
    check(make_case([1, 2, 20, 45], [1, 1, 1, 1], bs=4, dtype=dtype, **TINY), num_splits=splits)


def test_split_kv_prefill_with_padding():
    check(make_case([13, 5], [4, 5], bs=4, pad=1, **TINY), num_splits=3)


def test_heads_over_several_programs():
    # 80 heads: 2 programs of 64 (fp16) or 5 of 16 (fp32) per token, the last one partly masked
    for dtype in DTYPES:
        check(make_case([9, 19], [1, 2], bs=4, dtype=dtype, H=80, C=40, V=32))


def test_no_rope_part():
    check(make_case([9, 19], [1, 2], bs=4, H=4, C=32, V=32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_deepseek_like_dims(dtype):
    dims = dict(H=16, C=576, V=512)
    check(make_case([3, 40], [1, 2], bs=16, dtype=dtype, **dims))
    check(make_case([33], [1], bs=16, dtype=dtype, seed=1, **dims), num_splits=2)


def test_strided_inputs():
    case = make_case([7, 18], [2, 1], bs=4, **TINY)
    q, cache = case["q"], case["cache"]
    wide_q = torch.randn(q.shape[0], q.shape[1] + 1, q.shape[2] + 8, device=q.device)
    wide_q[:, : q.shape[1], : q.shape[2]] = q
    wide_c = torch.randn(cache.shape[0], cache.shape[1] + 8, device=q.device)
    wide_c[:, : cache.shape[1]] = cache
    strided = dict(case, q=wide_q[:, : q.shape[1], : q.shape[2]], cache=wide_c[:, : cache.shape[1]])
    torch.testing.assert_close(latent_attention(**strided), latent_attention(**case))


def test_matches_project_reference():
    from tbo_compiler.runtime.kernels.torch_ref import latent_attention as torch_ref
    case = make_case([5, 14], [2, 3], bs=4, pad=1, **TINY)
    q, V = case["q"], case["v_dim"]
    ref = torch_ref(q[..., :V], q[..., V:], case["cache"], case["block_table"], case["positions"],
                    case["block_size"], case["scale"])
    torch.testing.assert_close(latent_attention(**case), ref, rtol=1e-5, atol=1e-5)


def test_split_rule_depends_on_shapes_only():
    ns = triton_mla._num_splits
    assert ns(64, 2, 256 * 64, 132) == 1          # 128 programs already fill one wave
    assert ns(32, 2, 256 * 64, 132) == 2
    assert ns(1, 2, 256 * 64, 132) == triton_mla._MAX_SPLITS
    assert ns(1, 2, 8 * 16, 132) == 1            # a 128-key table is not worth splitting
    assert ns(4096, 2, 8 * 64, 132) == 1


def test_supported():
    q, r = torch.zeros(2, 4, 32, device=DEV), torch.zeros(2, 4, 8, device=DEV)
    c = torch.zeros(8, 40, device=DEV)
    assert supported(q, r, c)
    assert supported(q.half(), r.half(), c.half(), torch.zeros(2, 3, dtype=torch.int32, device=DEV))
    assert not supported(q, r, c.half())
    assert not supported(q.long(), r.long(), c.long())
    assert not supported(q, r, torch.zeros(8, 41, device=DEV))


# Step 3: GPU only: bf16, the DeepSeek-V3 shapes, CUDA-graph capture ----------------------------

@gpu_only
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("bs", [4, 64])
def test_bf16_on_gpu(bs, splits):
    check(make_case([1, 5, 17, 70], [1, 2, 1, 3], bs=bs, pad=1, dtype=torch.bfloat16, **TINY),
          num_splits=splits)


DEEPSEEK = dict(H=128, C=576, V=512, dtype=torch.bfloat16)


@gpu_only
@pytest.mark.parametrize("ctx,new,bs", [([512] * 64, [1] * 64, 64),       # decode T=64
                                        ([512] * 2, [512] * 2, 16),        # prefill T=1024
                                        ([300, 900], [1, 1], 64)])         # split-KV decode
def test_deepseek_shapes_on_gpu(ctx, new, bs):
    check(make_case(ctx, new, bs=bs, width=300, **DEEPSEEK))


@gpu_only
@pytest.mark.parametrize("T", [4, 64])                                   # split-KV and not
def test_cuda_graph_replay(T):
    a = make_case([100 + 7 * i for i in range(T)], [1] * T, bs=64, width=64, seed=0, **DEEPSEEK)
    b = make_case([400 - 5 * i for i in range(T)], [1] * T, bs=64, width=64, seed=1, **DEEPSEEK)
    static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.items()}
    # pool sizes differ between the cases: give both the larger cache
    n = max(a["cache"].shape[0], b["cache"].shape[0])
    for case in (a, b, static):
        case["cache"] = torch.cat([case["cache"], case["cache"].new_zeros(n - case["cache"].shape[0],
                                                                          case["cache"].shape[1])])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        latent_attention(**static)                                      # compile outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = latent_attention(**static)
    for case in (a, b):
        for k, v in case.items():
            if torch.is_tensor(v):
                static[k].copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(**case)
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < TOL[torch.bfloat16], f"replay relative error {err:.2e}"
