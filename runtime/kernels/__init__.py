"""Kernel backends behind one selector.

A backend is one module with the same small interface:
    NAME                      its name in logs and overrides
    available() -> bool       probed once (imports, device); False drops it with one log line
    supports(op, args) -> bool  whether it takes these tensors (device, dtype, dims)
    IMPLS: {op name: fn}      fn has the op's signature (ops/kernels.py)

`select(op, args)` walks the op's preference list and returns the first backend that is available
and supports the arguments, logging each choice once. The eager custom ops go through it on every
call; the compiled program calls it once per node when it is built, so running costs no selection.
Adding a backend (aiter on ROCm, say) is one module and one entry in PREFERENCE.

Override with TBO_KERNELS="op=backend,..." (e.g. "moe_experts=triton") or `prefer(op, backend)`:
the preferred backend is tried first, and the list continues if it does not take the arguments.

A backend whose first call for an op fails (a kernel that does not compile on this GPU, say) is
dropped for that op with one warning naming the error, and the call goes to the next backend:
`call_checked` wraps that first call; later calls go straight to the kernel.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch

from tbo_compiler.ops import impl as op_impl
from tbo_compiler.ops.errors import RuntimeFailure
from tbo_compiler.ops.kernels import KERNEL_OPS
from tbo_compiler.runtime.env import flag

log = logging.getLogger(__name__)

#: backend name -> module (relative to this package)
MODULES = {"torch": ".torch_ref", "grouped_mm": ".grouped_mm", "triton": ".triton_backend",
           "aiter": ".aiter_backend", "tuned": ".moe_tuned", "cublas": ".cublas"}
#: op -> backends in order of preference; "torch" (the reference) takes anything
PREFERENCE: dict[str, list[str]] = {
    "latent_attention": ["triton", "torch"],
    "paged_attention": ["triton", "torch"],
    # "tuned" (moe_tuned.py) times the fused Triton kernel at several tiles and the grouped-GEMM
    # path per shape and keeps the fastest; before it, the fused Triton kernel at its default tiles
    # beat sort + gather + torch._grouped_mm + index_add 2.1x (prefill 4096) and 2.1x (decode 512)
    # on H200 (bench/results/kernels_h200.log) but lost at Qwen3's 128 experts (issue 24)
    "moe_experts": ["tuned", "triton", "grouped_mm", "torch"],
    "rms_norm": ["triton", "torch"],
    "add_rms_norm": ["triton", "torch"],
    "silu_mul": ["triton", "torch"],
    "rope_interleaved": ["triton", "torch"],
    "rope_half": ["triton", "torch"],
    # q/k norms, both ropes and the k|v stack in one launch instead of five: on an H200, 35 against
    # 60 us a Qwen3 layer at 4096 tokens, 3.7 against 9.5 us at 256 (bench/results/moe_h200/rope_bench)
    "qk_rope_kv": ["triton", "torch"],
    "dispatch_pack": ["torch"],
    # a 16-bit GEMM with fp32 output on the tensor cores, not an fp32 GEMM on the FMA units: the
    # routers' logits cost 57 us a layer at Qwen3 prefill 4096 as fp32 (bench/results/roofline_h200)
    "linear_f32": ["cublas", "torch"],
    # softmax + top-k + renormalisation in one launch, not five kernels: 15 us a layer at Qwen3
    # decode 256 on an H200 in the torch form (bench/results/roofline_h200, trace)
    "route_topk": ["triton", "torch"],
}
#: ops aiter implements; it goes first for them on ROCm builds of torch only (elsewhere the lists
#: above are unchanged and only TBO_KERNELS / prefer() reach it)
AITER_OPS = ("latent_attention", "moe_experts")
if getattr(torch.version, "hip", None):
    for _op in AITER_OPS:
        PREFERENCE[_op].insert(0, "aiter")
_LOADED: dict[str, object | None] = {}
_PREFER: dict[str, str] = {}
_CHOSEN: dict[tuple, str] = {}
_BROKEN: set[tuple[str, str]] = set()   # (op, backend) whose first call raised
_PROVEN: set[tuple] = set()             # (op, backend, signature) that ran once


def _module(name: str):
    if name not in _LOADED:
        try:
            mod = importlib.import_module(MODULES[name], __name__)
            ok = mod.available()
            why = "not available on this machine"
        except Exception as e:  # a backend that cannot load is skipped, never fatal
            mod, ok, why = None, False, f"{type(e).__name__}: {e}"
        if not ok:
            if name != "torch":
                log.info("kernel backend %s is unavailable (%s); falling back", name, " ".join(why.split()))
            mod = None
        _LOADED[name] = mod
    return _LOADED[name]


def prefer(op: str, backend: str) -> None:
    if op not in PREFERENCE or backend not in MODULES:
        raise RuntimeFailure(f"no kernel backend {backend!r} for {op!r}; ops: {sorted(PREFERENCE)}, "
                             f"backends: {sorted(MODULES)}")
    _PREFER[op] = backend
    _CHOSEN.clear()


def _env_preferences() -> None:
    for item in filter(None, flag("TBO_KERNELS").split(",")):
        op, _, backend = item.partition("=")
        prefer(op.strip(), backend.strip())


def _signature(args: tuple) -> tuple:
    import torch
    return tuple((a.device.type, a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a)
                 for a in args)


def select(op: str, args: tuple) -> tuple[str, Callable]:
    """(backend name, function) for `op` on these arguments."""
    order = PREFERENCE[op]
    if op in _PREFER:
        order = [_PREFER[op]] + [b for b in order if b != _PREFER[op]]
    for name in order:
        if (op, name) in _BROKEN:
            continue
        mod = _module(name)
        if mod is not None and op in mod.IMPLS and mod.supports(op, args):
            key = (op, name, _signature(args[:1]))
            if key not in _CHOSEN:
                _CHOSEN[key] = name
                log.info("kernel %s: backend %s for %s", op, name, _signature(args[:1])[0])
            return name, mod.IMPLS[op]
    raise RuntimeFailure(f"no kernel backend takes {op} with {_signature(args)}")


def call_checked(op: str, args: tuple) -> tuple[str, Callable, object]:
    """Select and call; a backend's failing first call drops it and tries the next one.
    -> (backend name, function, result)."""
    while True:
        name, fn = select(op, args)
        key = (op, name, _signature(args))
        if name == "torch" or key in _PROVEN:
            return name, fn, fn(*args)
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - a broken backend falls back, never crashes
            log.warning("kernel %s: backend %s failed on first use (%s); falling back",
                        op, name, " ".join(f"{type(e).__name__}: {e}".split())[:300])
            _BROKEN.add((op, name))
            continue
        _PROVEN.add(key)
        return name, fn, out


def _eager(op: str) -> Callable:
    def run(*args):
        return call_checked(op, args)[2]
    run.__name__ = f"tbo_{op}"
    return run


_env_preferences()
for _op in KERNEL_OPS:
    op_impl.bind(_op, _eager(_op))

__all__ = ["select", "call_checked", "prefer", "PREFERENCE", "MODULES"]
