"""The fused Triton kernels against the torch expressions they replace (CPU: Triton's interpreter).

Exactness, per kernel (see the kernel module's docstring for why):
  rms_norm   bit-exact when the row's sum of squares is exact in fp32 in any order (inputs k/8);
             otherwise the summation order differs from torch's, the normalised value can be one
             ulp off and the weight product (rounded again) two: rare, and bounded by that.
  silu_mul   bf16 bit-exact (checked on every finite bf16 gate value); fp16 within 2 ulps on CPU,
             where numpy's exp and torch's (Sleef) exp differ in a few last bits (silu one ulp,
             the product rounded again two).
  rope_*     fp32 to 1e-5, 16-bit within 1 ulp or 1e-5 (cos/sin implementations differ by an fp32
             ulp on CPU; near-zero results of x0*cos - x1*sin turn that into many 16-bit ulps).
"""
from __future__ import annotations

import os

import pytest
import torch

from tbo_compiler.runtime.kernels import torch_ref
from tbo_compiler.runtime.kernels import triton_elementwise as te

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(request):
    """A fresh, logged seed per test: new random inputs every run, reproducible from the log."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"{request.node.name}: seed {seed}")
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEV)


def exact_sum_input(gen, *shape, dtype):
    """k/8, k in +-1..16: squares are multiples of 1/64, so any-order fp32 sums are exact."""
    k = torch.randint(1, 17, shape, generator=gen) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
    return (k / 8).to(dtype).to(DEV)


# References: the torch reference backend (the expressions of models/) ------------------------

ref_rms_norm, ref_silu_mul = torch_ref.rms_norm, torch_ref.silu_mul
ref_rope_interleaved, ref_rope_half = torch_ref.rope_interleaved, torch_ref.rope_half


# Comparisons --------------------------------------------------------------------------------

def ulps(a, b):
    """Distance in units in the last place between two 16-bit float tensors."""
    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i + 32768), i)  # sign-magnitude -> monotone integers
    return (ordered(a) - ordered(b)).abs()


def assert_close(out, ref, *, exact=False, atol=1e-6, rtol=1e-6, max_ulps=1, max_frac=1e-3, abs16=0.0):
    """fp32: allclose. 16-bit: within max_ulps, and off at all in few elements; abs16 excuses
    elements whose absolute error is that small (cancellation: x0*cos - x1*sin near zero)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    if exact:
        bad = out != ref
        assert not bad.any(), f"{int(bad.sum())} of {out.numel()} differ: {out[bad][:4]} vs {ref[bad][:4]}"
    elif out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    else:
        d = ulps(out, ref)
        d = torch.where((out.float() - ref.float()).abs() <= abs16, 0, d)
        assert int(d.max()) <= max_ulps, f"max {int(d.max())} ulps"
        assert int((d > 0).sum()) <= max(8, max_frac * out.numel()), f"{int((d > 0).sum())} elements differ"


def inv_freq_for(R, theta=10000.0):
    return (1.0 / theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R)).to(DEV)


# 1. rms_norm --------------------------------------------------------------------------------

def rms_inputs(gen, case, dtype, exact):
    def make(*shape):
        return exact_sum_input(gen, *shape, dtype=dtype) if exact else randn(gen, *shape, dtype=dtype)
    if case == "rows40":
        return make(5, 40)
    if case == "heads":                      # leading dims [T, H] (Qwen q_norm)
        return make(3, 4, 64)
    if case == "wide_slice":                 # DeepSeek hidden, rows of a wider buffer
        return make(3, 7168 + 64)[:, 32:32 + 7168]
    if case == "two_strides":                # [T, H, D] slice: T and H strides do not merge
        return make(3, 8, 96)[:, :5, 32:]
    if case == "three_strides":              # falls back to a copy
        return make(2, 3, 4, 48)[:, :, :3, 8:40]
    raise ValueError(case)


RMS_CASES = ["rows40", "heads", "wide_slice", "two_strides", "three_strides"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", RMS_CASES)
def test_rms_norm_exact(gen, case, dtype):
    x = rms_inputs(gen, case, dtype, exact=True)
    w = randn(gen, x.shape[-1], dtype=dtype)
    assert_close(te.rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6), exact=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["rows40", "heads", "wide_slice", "two_strides"])
def test_rms_norm_random(gen, case, dtype):
    x = rms_inputs(gen, case, dtype, exact=False)
    w = randn(gen, x.shape[-1], dtype=dtype)
    assert_close(te.rms_norm(x, w, 1e-5), ref_rms_norm(x, w, 1e-5), max_ulps=2)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["rows40", "heads", "wide_slice", "two_strides", "three_strides"])
def test_add_rms_norm(gen, case, dtype, exact):
    """The residual sum is torch's x + residual bit for bit (one rounding); the norm of it as rms_norm
    (exact with order-independent sums: k/8 + k/8 is still a multiple of 1/8 of at most 4)."""
    x, r = rms_inputs(gen, case, dtype, exact), rms_inputs(gen, case, dtype, exact)
    w = randn(gen, x.shape[-1], dtype=dtype)
    out, h = te.add_rms_norm(x, r, w, 1e-6)
    want_out, want_h = torch_ref.add_rms_norm(x, r, w, 1e-6)
    assert h.dtype == x.dtype and h.is_contiguous() and torch.equal(h, want_h)
    assert_close(out, want_out, exact=exact, max_ulps=2)


def test_add_rms_norm_op_and_zero_rows(gen):
    import tbo_compiler.ops  # noqa: F401  (registers the tbo ops)
    x, r, w = randn(gen, 6, 64), randn(gen, 6, 64), randn(gen, 64)
    out, h = torch.ops.tbo.add_rms_norm(x.cpu(), r.cpu(), w.cpu(), 1e-6)  # CPU: the torch reference
    assert torch.equal(h, x.cpu() + r.cpu()) and torch.equal(out, ref_rms_norm(x.cpu() + r.cpu(), w.cpu(), 1e-6))
    e, h0 = te.add_rms_norm(x[:0], r[:0], w, 1e-6)
    assert e.shape == h0.shape == (0, 64)
    with pytest.raises(AssertionError, match="residual"):
        te.add_rms_norm(x, r[:3], w, 1e-6)


def test_rms_norm_fp32_weight_bf16_x(gen):
    x = exact_sum_input(gen, 4, 512, dtype=torch.bfloat16)
    w = randn(gen, 512)
    out = te.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    assert_close(out, ref_rms_norm(x, w, 1e-6), exact=True)


# 2. silu_mul --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, sl", [((5, 80), None), ((3, 2, 128), None),
                                       ((4, 2 * 1536 + 16), slice(8, 8 + 2 * 1536))])  # a wider buffer
def test_silu_mul(gen, shape, sl, dtype):
    gu = randn(gen, *shape, dtype=dtype, scale=3.0)
    if sl is not None:
        gu = gu[..., sl]
    assert_close(te.silu_mul(gu), ref_silu_mul(gu), exact=dtype == torch.bfloat16, max_ulps=2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: exp(-g) overflows for g << 0, as intended
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_silu_mul_every_gate_value(gen, dtype):
    """Every finite 16-bit value as a gate, random up: bf16 must match everywhere."""
    g = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    g = g[torch.isfinite(g)].to(DEV)
    g = g[: g.numel() // 256 * 256].view(-1, 256)
    gu = torch.cat([g, randn(gen, *g.shape, dtype=dtype)], -1)
    assert_close(te.silu_mul(gu), ref_silu_mul(gu), exact=dtype == torch.bfloat16, max_ulps=2)


# 3./4. rope ---------------------------------------------------------------------------------

def rope_input(gen, case, dtype):
    if case == "mla_q":                      # q_pe: last 64 columns of [T, H, 192]
        return randn(gen, 5, 4, 192, dtype=dtype)[..., 128:]
    if case == "mla_k":                      # k_pe: last 64 columns of kv_a's [T, 576]
        return randn(gen, 6, 576, dtype=dtype)[:, 512:]
    if case == "r40":                        # R/2 not a power of two, extra leading dim
        return randn(gen, 3, 2, 3, 40, dtype=dtype)
    if case == "qkv_view":                   # q of a fused qkv projection, viewed [T, H, Dh]
        return randn(gen, 4, 6 * 128, dtype=dtype)[:, : 4 * 128].view(4, 4, 128)
    raise ValueError(case)


def positions(gen, T):
    return torch.randint(0, 8192, (T,), generator=gen).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["mla_q", "mla_k", "r40"])
def test_rope_interleaved(gen, case, dtype):
    x = rope_input(gen, case, dtype)
    pos, f = positions(gen, x.shape[0]), inv_freq_for(x.shape[-1])
    mul = 1.0 + float(torch.rand((), generator=gen))  # yarn's mscale ratio
    out, ref = te.rope_interleaved(x, pos, f, mul), ref_rope_interleaved(x, pos, f, mul)
    assert_close(out, ref, atol=1e-5, rtol=1e-5, abs16=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["qkv_view", "r40"])
def test_rope_half(gen, case, dtype):
    x = rope_input(gen, case, dtype)
    if x.dim() > 3:
        x = x.flatten(1, 2)
    pos, f = positions(gen, x.shape[0]), inv_freq_for(x.shape[-1], theta=1e6)
    assert_close(te.rope_half(x, pos, f), ref_rope_half(x, pos, f), atol=1e-5, rtol=1e-5, abs16=1e-5)


# Edge cases ---------------------------------------------------------------------------------

def test_zero_rows():
    bf = torch.bfloat16
    x, w = torch.empty(0, 64, dtype=bf, device=DEV), torch.ones(64, dtype=bf, device=DEV)
    pos, f = torch.empty(0, dtype=torch.long, device=DEV), inv_freq_for(64)
    assert te.rms_norm(x, w, 1e-6).shape == (0, 64)
    assert te.silu_mul(torch.empty(0, 3, 128, dtype=bf, device=DEV)).shape == (0, 3, 64)
    assert te.rope_interleaved(torch.empty(0, 4, 64, dtype=bf, device=DEV), pos, f, 1.0).shape == (0, 4, 64)
    assert te.rope_half(torch.empty(0, 4, 64, dtype=bf, device=DEV), pos, f).shape == (0, 4, 64)


def test_single_row_1d(gen):
    x, w = exact_sum_input(gen, 40, dtype=torch.bfloat16), randn(gen, 40, dtype=torch.bfloat16)
    assert_close(te.rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6), exact=True)
    gu = randn(gen, 80, dtype=torch.bfloat16)
    assert_close(te.silu_mul(gu), ref_silu_mul(gu), exact=True)


def test_supported():
    x = torch.ones(4, 8, device=DEV)
    assert te.supported(x, x.bfloat16(), x.half(), torch.zeros(4, dtype=torch.long, device=DEV))
    assert not te.supported(x.t())           # last dim strided
    assert not te.supported(x.double())
    assert te.supported(x[:, :4])            # strided rows are fine


# GPU: DeepSeek shapes, bf16, and CUDA-graph capture -----------------------------------------

def _gpu_cases(gen):
    bf = torch.bfloat16
    T = 256
    x = torch.randn(T, 7168, generator=gen).to("cuda", bf)
    kv = torch.randn(T, 576, generator=gen).to("cuda", bf)
    q = torch.randn(T, 128, 192, generator=gen).to("cuda", bf)
    pos = torch.randint(0, 16384, (T,), generator=gen).cuda()
    f = (1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)).cuda()
    f128 = (1.0 / 1e6 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)).cuda()   # Qwen head_dim 128
    w = torch.randn(7168, generator=gen).to("cuda", bf)

    def rope_i(a):
        return te.rope_interleaved(a, pos, f, 1.1)

    def ref_rope_i(a):
        return ref_rope_interleaved(a, pos, f, 1.1)

    return {   # name: (kernel, reference, static input, exact)
        "rms_norm": (lambda a: te.rms_norm(a, w, 1e-6), lambda a: ref_rms_norm(a, w, 1e-6), x, False),
        "add_rms_norm": (lambda a: te.add_rms_norm(a, x, w, 1e-6)[0],
                         lambda a: torch_ref.add_rms_norm(a, x, w, 1e-6)[0], x.clone(), False),
        "rms_norm_kv_slice": (lambda a: te.rms_norm(a, w[:512], 1e-6),
                              lambda a: ref_rms_norm(a, w[:512], 1e-6), kv[:, :512], False),
        "silu_mul": (te.silu_mul, ref_silu_mul, torch.randn(T, 4096, generator=gen).to("cuda", bf) * 3, True),
        "rope_q": (rope_i, ref_rope_i, q[..., 128:], False),
        "rope_k": (rope_i, ref_rope_i, kv[:, 512:], False),
        "rope_half": (lambda a: te.rope_half(a, pos, f128), lambda a: ref_rope_half(a, pos, f128),
                      torch.randn(T, 64, 128, generator=gen).to("cuda", bf), False),
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_deepseek_shapes_and_cuda_graph(gen):
    for name, (fn, ref, arg, exact) in _gpu_cases(gen).items():
        assert_close(fn(arg), ref(arg), exact=exact, max_ulps=2, abs16=1e-5)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(arg)
        arg.copy_(torch.randn(arg.shape, generator=gen).to(arg.device, arg.dtype))  # new values, same buffer
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fn(arg)), name
        assert_close(out, ref(arg), exact=exact, max_ulps=2, abs16=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [7168, 1536, 512])
def test_gpu_rms_norm_bit_exact(gen, D):
    """With order-independent sums, CUDA rms_norm (mean = sum * fp32(1/D), rsqrtf) matches exactly."""
    x = exact_sum_input(gen, 256, D, dtype=torch.bfloat16)
    w = randn(gen, D, dtype=torch.bfloat16)
    assert_close(te.rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6), exact=True)
