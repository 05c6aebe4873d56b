"""Every environment flag tbo-compiler reads: one table, each flag with its default and meaning.

A flag is read when it is used (an engine may change one between steps), always through `flag`;
a value that does not parse fails with one line naming the flag.

    TBO_DUMP_DIR                  path   unset   write graph/schedule dumps of every compiled graph there
                                                 (torch.compile and tbo-compile's --dump-dir default)
    TBO_DUMP_LAYERS               a:b    unset   layers the graph SVGs draw in full ("a:b", "a", "all";
                                                 default: the first layer with comm and the next)
    TBO_INDUCTOR                  0|1    1       backend="tbo": compute between comm points as Inductor regions
    TBO_CUDA_GRAPHS               0|1    1       a plan's programs replayed as CUDA graphs (CUDA only; 0: eager)
    TBO_KERNELS                   op=backend,... a kernel backend per op (runtime/kernels), over the selector
    TBO_MOE_TUNING                path   (1)     the file of moe_experts' per-shape choices, measured once per
                                                 GPU (runtime/kernels/moe_tuned.py); "off": default tiles
                                                 (1) ~/.cache/tbo_compiler/moe_tuning.json
    TBO_GQA_TILES                 0|1    1       paged attention: one request's runs of tokens (prefill) as
                                                 MMA tiles (runtime/kernels/triton_gqa.py); 0: per token only
    TBO_GQA_TOKEN_LOOP            0|1    1       paged attention after the tiles: each per-token program takes
                                                 several tokens (prefill: few programs that find them done)
    TBO_GQA_HEAD_FIRST            0|1    1       paged attention's per-token programs ordered kv head first (a
                                                 token's heads side by side); 0: token first
    TBO_KV_WRITE_WIDE             0|1    1       the runtime's in-place KV-cache writes by a row-scatter kernel
                                                 (8-byte words; runtime/program.py); 0: ATen's index_put_
    TBO_ROUTE_TILES               name   auto    MoE routing kernel's rows a program and warps: auto (by T and
                                                 E, runtime/kernels/triton_route.py) or legacy (the first rule)
    TBO_COMM                      name   unset   the comm backend of every multi-rank group (runtime/comm)
    TBO_COMM_TIMEOUT_S            s      300     how long a collective waits for its peers before the rank
                                                 fails naming them (runtime/comm/faults.py)
    TBO_MORI_KERNEL               name   AsyncLL mori's dispatch/combine kernel type
    TBO_MORI_SHMEM_INIT           0|1    1       0: the caller initialised mori's shmem itself
    TBO_MORI_MAX_TOKENS           int    0       rows mori's buffers are sized for (at least the bucket)
    TBO_MORI_GPUS_PER_NODE        int    8       GPUs of one node (mori's intra-node path)
    TBO_AITER_MLA_PREFILL_TOKENS  int    1024    from this many tokens, MLA on aiter takes the prefill kernel
    TRITON_INTERPRET              0|1    0       Triton's own flag: the kernels pick CPU-interpretable tiles
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from tbo_compiler.ops.errors import RuntimeFailure, TboCompileError


# Step 1: how a flag's text becomes its value -------------------------------------------------

def _text(name: str, raw: str, default):
    return raw


def _not_zero(name: str, raw: str, default) -> bool:   # on unless exactly "0"
    return raw != "0"


def _is_one(name: str, raw: str, default) -> bool:     # off unless exactly "1"
    return raw == "1"


def _number(cast, what: str):
    def parse(name: str, raw: str, default):
        raw = raw.strip()
        try:
            return cast(raw) if raw else default
        except ValueError:
            raise RuntimeFailure(f"{name}={raw!r} is not {what}") from None
    return parse


def _seconds(name: str, raw: str, default) -> float:
    value = _number(float, "a number")(name, raw, default)
    if value <= 0:
        raise RuntimeFailure(f"{name}={value} must be a positive number of seconds")
    return value


def _switch(name: str, raw: str, default) -> bool:   # read while compiling: a compile error
    raw = raw.strip().lower()
    if raw not in ("0", "1", "false", "true", ""):
        raise TboCompileError(f"{name}={raw!r} must be 0 or 1")
    return raw not in ("0", "false")


def _choice(*values: str):
    def parse(name: str, raw: str, default):
        raw = raw.strip().lower() or default
        if raw not in values:
            raise RuntimeFailure(f"{name}={raw!r} must be one of {', '.join(values)}")
        return raw
    return parse


# Step 2: the table ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Flag:
    name: str
    default: Any                                # the value when the variable is not set
    parse: Callable[[str, str, Any], Any]       # (name, text, default) -> value, or one-line error
    meaning: str


FLAGS: dict[str, Flag] = {f.name: f for f in (
    Flag("TBO_DUMP_DIR", None, _text, "write graph/schedule dumps there"),
    Flag("TBO_DUMP_LAYERS", None, _text, "layers the graph SVGs draw in full (a:b, a, all)"),
    Flag("TBO_INDUCTOR", True, _switch, "backend='tbo' runs compute between comm points as Inductor regions"),
    Flag("TBO_CUDA_GRAPHS", True, _not_zero, "a plan's programs replay as CUDA graphs"),
    Flag("TBO_KERNELS", "", _text, "op=backend,...: a kernel backend per op"),
    Flag("TBO_MOE_TUNING", "", _text, "file of the per-GPU moe_experts choices ('off': none, default tiles)"),
    Flag("TBO_GQA_TILES", True, _not_zero, "paged attention takes one request's runs of tokens as tiles"),
    Flag("TBO_GQA_TOKEN_LOOP", True, _not_zero, "per-token attention programs take several tokens after the tiles"),
    Flag("TBO_GQA_HEAD_FIRST", True, _not_zero, "per-token attention programs ordered kv head first"),
    Flag("TBO_KV_WRITE_WIDE", True, _not_zero, "in-place KV-cache writes by a row-scatter kernel"),
    Flag("TBO_ROUTE_TILES", "auto", _choice("auto", "legacy"), "routing kernel tiles: auto or legacy (the first rule)"),
    Flag("TBO_COMM", None, _text, "the comm backend of every multi-rank group"),
    Flag("TBO_COMM_TIMEOUT_S", 300.0, _seconds, "seconds a collective waits for its peers"),
    Flag("TBO_MORI_KERNEL", "AsyncLL", _text, "mori's dispatch/combine kernel type"),
    Flag("TBO_MORI_SHMEM_INIT", True, _not_zero, "0: the caller initialised mori's shmem"),
    Flag("TBO_MORI_MAX_TOKENS", 0, _number(int, "an integer"), "rows mori's buffers are sized for"),
    Flag("TBO_MORI_GPUS_PER_NODE", 8, _number(int, "an integer"), "GPUs of one node (mori)"),
    Flag("TBO_AITER_MLA_PREFILL_TOKENS", 1024, _number(int, "an integer"),
         "tokens from which MLA on aiter takes the prefill kernel"),
    Flag("TRITON_INTERPRET", False, _is_one, "Triton's interpreter (CPU): the kernels pick its tiles"),
)}


# Step 3: reading one --------------------------------------------------------------------------

def flag(name: str):
    """The flag's value now: its default when unset, else its text parsed (one line if it does not)."""
    f = FLAGS[name]
    raw = os.environ.get(name)
    return f.default if raw is None else f.parse(name, raw, f.default)


COMM_TIMEOUT_ENV = "TBO_COMM_TIMEOUT_S"


def comm_timeout_s() -> float:
    """How long a collective of the runtime may wait for its peers before the rank fails with an
    error naming them (TBO_COMM_TIMEOUT_S, default 300 s)."""
    return flag(COMM_TIMEOUT_ENV)
