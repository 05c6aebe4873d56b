"""The project's Triton kernels as one backend (CUDA tensors; the kernel modules hold the code).

    latent_attention  triton_mla.py         MLA absorbed form, flash-style, split-KV for small T
    paged_attention   triton_gqa.py         GQA over the paged cache (sliding window, attention sinks)
    moe_experts       triton_moe.py         fused MoE (indirect row loads, expert biases and the
                                            GLU activation in the epilogues)
    rms_norm, add_rms_norm, silu_mul, rope_interleaved, rope_half   triton_elementwise.py
    route_topk        triton_route.py       router scores, top-k and weights in one launch
    qk_rope_kv        triton_rope.py        q/k head norms, rope_half and the k|v cache entry, one launch
"""
from __future__ import annotations

import importlib

import torch

NAME = "triton"
_WHERE = {"latent_attention": "triton_mla", "paged_attention": "triton_gqa", "moe_experts": "triton_moe",
          "rms_norm": "triton_elementwise", "add_rms_norm": "triton_elementwise",
          "silu_mul": "triton_elementwise",
          "rope_interleaved": "triton_elementwise", "rope_half": "triton_elementwise",
          "route_topk": "triton_route", "qk_rope_kv": "triton_rope"}


def available() -> bool:
    import triton  # noqa: F401  (the probe: Triton must import)
    return torch.cuda.is_available()


def _mod(op: str):
    return importlib.import_module(f".{_WHERE[op]}", __package__)


#: ops whose optional arguments (sinks, window; expert biases, activation; norm weights) the kernel
#: module's `supported` must see in place: it takes the op's own arguments, not only its tensors
_FULL_ARGS = frozenset({"paged_attention", "moe_experts", "route_topk", "qk_rope_kv"})


def supports(op: str, args: tuple) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not all(t.is_cuda for t in tensors):
        return False
    return bool(_mod(op).supported(*(args if op in _FULL_ARGS else tensors)))


class _Lazy(dict):
    """op -> the kernel function, importing its module on first use."""

    def __missing__(self, op):
        if op not in _WHERE:
            raise KeyError(op)
        fn = getattr(_mod(op), op)
        self[op] = fn
        return fn

    def __contains__(self, op):
        return op in _WHERE


IMPLS = _Lazy()
