"""Fake `aiter` (ROCm/aiter): the enums and the two submodules tbo-compiler calls.

The real kernels take bf16/fp16 (MLA decode: bf16 or fp8; MLA prefill: bf16 only); this stand-in
also takes fp32 where the real decode kernel and fused MoE would, so whole programs can be compared
with the torch reference in fp32. The prefill kernel's bf16-only rule is kept (the backend must
route around it)."""
from __future__ import annotations

import enum

#: every call: {"fn": name, "args": {parameter: value}}
CALLS: list[dict] = []


class ActivationType(enum.Enum):
    No = -1
    Silu = 0
    Gelu = 1
    Swiglu = 2


class QuantType(enum.Enum):
    No = 0
    per_Tensor = 1
    per_Token = 2
    per_1x32 = 3
    per_1x128 = 4
    per_128x128 = 5


from . import fused_moe, mla  # noqa: E402,F401  (import aiter.mla / aiter.fused_moe)
