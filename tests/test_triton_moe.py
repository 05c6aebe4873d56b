"""Triton fused MoE experts against a float64 per-expert reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16
only (the interpreter's bf16 tl.dot is wrong). bf16 at DeepSeek dims and CUDA-graph replay: GPU only.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tbo_compiler.runtime.kernels import triton_moe as tm

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def reference(x, ids, w, w13, w2, b13=None, b2=None, activation="silu", limit=0.0):
    """Per-expert loop in float64 (host syncs are fine here). Optional expert biases; "gpt_oss":
    (u + 1) * g * sigmoid(1.702 g); limit > 0: g <= limit, -limit <= u <= limit first."""
    N, D = x.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    out = torch.zeros(N, D, dtype=torch.float64, device=x.device)
    for e in range(E):
        rows, ks = (ids.long() == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        hh = x[rows].double() @ w13[e].double().T
        if b13 is not None:
            hh = hh + b13[e].double()
        g, u = hh[:, :I], hh[:, I:]
        if limit > 0:
            g, u = torch.minimum(g, torch.tensor(limit)), torch.clamp(u, -limit, limit)
        act = F.silu(g) * u if activation == "silu" else (u + 1) * g / (1 + torch.exp(-1.702 * g))
        y = act @ w2[e].double().T
        if b2 is not None:
            y = y + b2[e].double()
        out.index_add_(0, rows, y * w[rows, ks].double().unsqueeze(-1))
    return out


def make(N, D, I, E, K, dtype, id_dtype=torch.int64, p_invalid=0.5, drop_expert=None, seed=0, device=DEV):
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: DeepSeek-size weights
    kw = dict(generator=g, device=device)
    x = torch.randn(N, D, **kw)
    ids = torch.randint(0, E, (N, K), **kw)
    ids = torch.where(torch.rand(N, K, **kw) < p_invalid, -1, ids)
    if drop_expert is not None:
        ids = torch.where(ids == drop_expert, -1, ids)
    w = torch.rand(N, K, **kw)
    w13 = torch.randn(E, 2 * I, D, **kw) / D ** 0.5
    w2 = torch.randn(E, D, I, **kw) / I ** 0.5
    return x.to(dtype), ids.to(id_dtype), w, w13.to(dtype), w2.to(dtype)


def check(args, **kw):
    out = tm.moe_experts(*args, **kw)
    x = args[0]
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = reference(*args)
    tol = TOL[x.dtype]
    scale = max(float(ref.abs().max()), 1e-30)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * scale)
    return out


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_many_invalid_and_an_empty_expert(dtype, id_dtype):
    args = make(37, 64, 32, 8, 3, dtype, id_dtype, p_invalid=0.6, drop_expert=5)
    assert tm.supported(*args)
    check(args)


def test_ragged_dims_several_blocks_per_expert():
    """D, I not multiples of the tiles (masked K loop, wrapped N columns), >1 block per expert."""
    cfg = tm.MoeConfig(16, tm.GemmTile(32, 32, 4, 1), tm.GemmTile(32, 32, 4, 1), group_m=2, block_d=32)
    args = make(40, 80, 48, 3, 2, torch.float32, p_invalid=0.2, seed=1)
    check(args, config=cfg)


def test_routing_as_views_of_packed_meta():
    """ids and weights as strided views of one int32 [N, 2K] tensor (the dispatch meta layout)."""
    x, ids, w, w13, w2 = make(23, 64, 32, 4, 3, torch.float32, torch.int32, seed=2)
    meta = torch.cat([ids, w.view(torch.int32)], dim=1)
    ids_v, w_v = meta[:, :3], meta[:, 3:].view(torch.float32)
    assert not ids_v.is_contiguous() and not w_v.is_contiguous()
    check((x, ids_v, w_v, w13, w2))


def test_all_invalid_gives_zeros():
    x, ids, w, w13, w2 = make(9, 64, 32, 8, 3, torch.float32)
    out = tm.moe_experts(x, torch.full_like(ids, -1), w, w13, w2)
    assert torch.equal(out, torch.zeros_like(x))


def test_no_rows_and_one_row():
    x, ids, w, w13, w2 = make(1, 64, 32, 8, 3, torch.float32, p_invalid=0.0)
    assert tm.moe_experts(x[:0], ids[:0], w[:0], w13, w2).shape == (0, 64)
    check((x, ids, w, w13, w2))


def test_supported():
    args = make(4, 64, 32, 8, 3, torch.float32)
    assert tm.supported(*args)
    x, ids, w, w13, w2 = args
    assert not tm.supported(x.double(), ids, w, w13.double(), w2.double())
    assert not tm.supported(x, ids.float(), w, w13, w2)
    assert not tm.supported(x, ids, w, w13[:, :-1], w2)
    assert not tm.supported(x.half(), ids, w, w13, w2)
    if not GPU:
        assert not tm.supported(x.bfloat16(), ids, w, w13.bfloat16(), w2.bfloat16())


# Expert biases and GPT-OSS's clamped activation ---------------------------------------------------

def _biased(args, scale=6.0, seed=3):
    """args with x scaled so many gate/up values pass the limit of 7, plus expert biases."""
    x, ids, w, w13, w2 = args
    g = torch.Generator(device=x.device).manual_seed(seed)
    E, I2, D = w13.shape
    b13 = torch.randn(E, I2, generator=g, device=x.device).to(x.dtype)
    b2 = torch.randn(E, D, generator=g, device=x.device).to(x.dtype)
    return (x * scale, ids, w, w13, w2, b13, b2)


@pytest.mark.parametrize("activation,limit", [("gpt_oss", 7.0), ("silu", 7.0), ("gpt_oss", 0.0)])
def test_biases_and_clamped_activation(activation, limit):
    args = _biased(make(37, 64, 32, 8, 3, torch.float32, p_invalid=0.4, drop_expert=2, seed=4))
    assert tm.supported(*args, activation, limit)
    out = check((*args, activation, limit))
    if limit:  # the clamp bites: without it the result is another one
        assert (reference(*args, activation, 0.0) - out.double()).abs().max() > 1.0


def test_biases_ragged_dims():
    """Bias loads follow the wrapped columns of ragged tiles (D, I not multiples of the tiles)."""
    cfg = tm.MoeConfig(16, tm.GemmTile(32, 32, 4, 1), tm.GemmTile(32, 32, 4, 1), group_m=2, block_d=32)
    args = _biased(make(40, 80, 48, 3, 2, torch.float32, p_invalid=0.2, seed=5), scale=2.0)
    check((*args, "gpt_oss", 7.0), config=cfg)


def test_torch_backends_biases_and_activation():
    """The torch reference backend, on the same arguments, through the op (CPU: torch backend)."""
    args = _biased(make(29, 64, 32, 8, 3, torch.float32, p_invalid=0.3, seed=6, device="cpu"))
    out = torch.ops.tbo.moe_experts(*args, "gpt_oss", 7.0)
    ref = reference(*args, "gpt_oss", 7.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_biased_supported():
    x, ids, w, w13, w2, b13, b2 = _biased(make(4, 64, 32, 8, 3, torch.float32))
    assert tm.supported(x, ids, w, w13, w2, b13, b2, "gpt_oss", 7.0)
    assert not tm.supported(x, ids, w, w13, w2, b13, b2, "gelu", 0.0)
    assert not tm.supported(x, ids, w, w13, w2, b13[:, :-1], b2)
    assert not tm.supported(x, ids, w, w13, w2, b13, b2[:-1])


# GPU only ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("N", [1, 96, 1024])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_deepseek_dims_bf16(N, id_dtype):
    args = make(N, 7168, 2048, 8, 8, torch.bfloat16, id_dtype, drop_expert=3, seed=N)
    check(args)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_cuda_graph_replay_with_new_routing():
    x, ids, w, w13, w2 = make(256, 512, 256, 8, 4, torch.bfloat16, torch.int32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compiles the kernels and warms the allocator outside the capture
        tm.moe_experts(x, ids, w, w13, w2)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.moe_experts(x, ids, w, w13, w2)
    for seed in (1, 2, 3):
        nx, nids, nw, _, _ = make(256, 512, 256, 8, 4, torch.bfloat16, torch.int32, seed=seed,
                                  p_invalid=0.3 * seed, drop_expert=seed)
        x.copy_(nx), ids.copy_(nids), w.copy_(nw)
        graph.replay()
        ref = reference(x, ids, w, w13, w2)
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("N", [1, 96, 1024])
def test_gpt_oss_dims_bf16(N):
    """GPT-OSS-20b's experts on one of 2 ranks: D = I = 2880, 16 local experts, top-4, biases, clamp."""
    args = _biased(make(N, 2880, 2880, 16, 4, torch.bfloat16, p_invalid=0.5, seed=N), scale=3.0)
    check((*args, "gpt_oss", 7.0))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU or not hasattr(torch, "_grouped_mm"), reason="needs a CUDA GPU and torch._grouped_mm")
def test_grouped_mm_biases_and_activation_bf16():
    from tbo_compiler.runtime.kernels import grouped_mm

    args = _biased(make(96, 256, 128, 8, 4, torch.bfloat16, p_invalid=0.3, seed=9), scale=3.0)
    out = grouped_mm.moe_experts(*args, "gpt_oss", 7.0)
    ref = reference(*args, "gpt_oss", 7.0)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
