"""tbo.linear_f32 (routers' fp32 logits from 16-bit activations and weights): the reference equals
the models' former F.linear(x.float(), w.float(), b.float()) exactly on CPU; on the GPU the cuBLAS
backend (16-bit GEMM, fp32 output) agrees with it to fp32 rounding and is the one selected."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tbo_compiler.ops  # noqa: F401  (registers the tbo ops)
from tbo_compiler.runtime import kernels
from tbo_compiler.runtime.kernels import cublas

GPU = torch.cuda.is_available()


def _args(dtype, device, bias=True, T=37, D=96, E=24):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, D, generator=g, device=device).to(dtype)
    w = (torch.randn(E, D, generator=g, device=device) / D ** 0.5).to(dtype)
    b = torch.randn(E, generator=g, device=device).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_is_the_fp32_linear(dtype, bias):
    x, w, b = _args(dtype, "cpu", bias)
    out = torch.ops.tbo.linear_f32(x, w, b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert kernels.select("linear_f32", (x, w) if b is None else (x, w, b))[0] == "torch"


def test_leading_dims_and_fake_shape():
    x, w, _ = _args(torch.bfloat16, "cpu", False)
    x3 = x[:36].reshape(4, 9, -1)
    assert torch.equal(torch.ops.tbo.linear_f32(x3, w), torch.ops.tbo.linear_f32(x[:36], w).reshape(4, 9, -1))
    with torch._subclasses.FakeTensorMode():
        fx_, fw = torch.empty(5, 3, 96, dtype=torch.bfloat16), torch.empty(24, 96, dtype=torch.bfloat16)
        out = torch.ops.tbo.linear_f32(fx_, fw)
        assert out.shape == (5, 3, 24) and out.dtype == torch.float32


def test_cublas_takes_only_16bit_cuda_inputs():
    x, w, b = _args(torch.bfloat16, "cpu")
    assert not cublas.supports("linear_f32", (x, w, b))  # CPU tensors
    assert not cublas.supports("rms_norm", (x, w, b))


@pytest.mark.skipif(not GPU, reason="CUDA")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cublas_agrees_with_reference_to_fp32_rounding(dtype, bias):
    x, w, b = _args(dtype, "cuda", bias, T=4096, D=2048, E=128)
    args = (x, w) if b is None else (x, w, b)
    assert kernels.select("linear_f32", args)[0] == "cublas"
    out = torch.ops.tbo.linear_f32(*args)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    # the same exact products summed in another fp32 order: |err| <= ~D * eps32 * sum|x w|
    bound = 2048 * 2 ** -24 * (x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs()))
    assert out.dtype == torch.float32 and bool(((out.double() - ref).abs() <= bound).all())
