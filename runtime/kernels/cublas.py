"""linear_f32 on the tensor cores: a 16-bit GEMM (cuBLAS) with an fp32 output.

The reference (torch_ref.linear_f32) casts x and the weight to fp32 and runs an fp32 GEMM, which
with TF32 off runs on the FMA units: the routers' logits took 57 us a layer at Qwen3 prefill 4096
and 26 us at GPT-OSS decode 256 on an H200 (bench/results/roofline_h200, trace). The product of
two 16-bit floats is exact in fp32 and the tensor cores accumulate in fp32, so `torch.mm(x, w^T,
out_dtype=torch.float32)` computes the same sum of the same exact products, in another order:
the logits agree to fp32 rounding (tests/test_linear_f32.py), not bit for bit with the reference;
eager and compiled programs call this same op, so they agree with each other exactly.
"""
from __future__ import annotations

import torch

NAME = "cublas"
_HALF = (torch.bfloat16, torch.float16)


def available() -> bool:
    return torch.cuda.is_available() and hasattr(torch.ops.aten.mm, "dtype")


def supports(op: str, args: tuple) -> bool:
    if op != "linear_f32":
        return False
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    return (x.is_cuda and x.dtype in _HALF and w.dtype == x.dtype and w.dim() == 2 and x.shape[-1] == w.shape[1]
            and (b is None or (b.dtype == x.dtype and b.dim() == 1 and b.shape[0] == w.shape[0])))


def linear_f32(x, weight, bias=None):
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.mm(x2, weight.t(), out_dtype=torch.float32)
    if bias is not None:  # in place, the bias widened inside the add: one kernel (GPT-OSS's routers,
        out.add_(bias)    # 24 graph nodes fewer a step than a cast and then an add), the same fp32 sums
    return out.reshape(*x.shape[:-1], weight.shape[0])


IMPLS = {"linear_f32": linear_f32}
