"""The MoE block shared by every architecture: route, move tokens, run local experts, move back.

Legend: T tokens on this rank, D hidden, K experts per token, E routed experts in all,
E_loc experts on this rank, W ranks in the expert-parallel group.

Parallel modes (`ParallelConfig.moe_comm`), all expressed with the `tbo` comm ops:
  a2a        tokens stay on their rank (DP attention); dispatch -> local experts -> combine
  allgather  DP attention; all_gather the (zero-padded) tokens -> route all -> local experts
             -> reduce_scatter back to their owners
  allreduce  every rank holds the same tokens (TP-style); local experts on all of them -> all_reduce
Shared experts run on the rank's own tokens and are added once; in a2a mode they are computed
after the dispatch starts, so they run while the tokens are on the wire.

Everything between two comm points is compute: packing tokens per destination rank
(`tbo::dispatch_pack`) before the dispatch, and summing the W partial results after the combine,
so a compiled program keeps its comm stream for communication alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tbo_compiler.ops  # noqa: F401  (registers the tbo ops)
from tbo_compiler.ops.kernels import MOE_ACTIVATIONS, unpack_meta

ops = torch.ops.tbo

MOE_COMM_MODES = ("a2a", "allgather", "allreduce")


@dataclass(frozen=True)
class ParallelConfig:
    ep_size: int = 1
    ep_rank: int = 0
    group: str = "ep"
    moe_comm: str = "a2a"

    def __post_init__(self):
        if self.moe_comm not in MOE_COMM_MODES:
            raise ValueError(f"moe_comm must be one of {MOE_COMM_MODES}, got {self.moe_comm!r}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} out of range for ep_size {self.ep_size}")


class RMSNorm(nn.Module):
    """RMSNorm as every architecture uses it (weight * normalised x)."""

    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # statistics in fp32 whatever the dtype

    def add(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual), the add rounded to x's dtype: one kernel."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (dense layers, shared experts). Gate and up are one GEMM: the checkpoint's
    gate_proj and up_proj are concatenated into gate_up_proj when loaded."""

    def __init__(self, dim: int, inter: int, dtype=None):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * inter, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter, dim, bias=False, dtype=dtype)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x_TD)))


def swiglu_checkpoint_names(param_prefix: str, disk_prefix: str) -> dict:
    """Checkpoint templates of a SwiGLU at `param_prefix` stored as HF's gate/up/down_proj."""
    return {f"{param_prefix}.gate_up_proj.weight": (f"{disk_prefix}.gate_proj.weight", f"{disk_prefix}.up_proj.weight"),
            f"{param_prefix}.down_proj.weight": f"{disk_prefix}.down_proj.weight"}


@dataclass(frozen=True)
class FusedExperts:
    """A checkpoint name template (`{}` = layer) of one on-disk tensor holding every expert of a
    layer, [E, ...] (GPT-OSS), where the other formats store one tensor per expert. The loader
    reads only this rank's experts. `mxfp4`: stored as `<name>_blocks` + `<name>_scales`
    (quant.py), dequantized; `deinterleave`: rows that alternate gate/up along dim 1 become
    [gate; up]."""
    template: str
    deinterleave: bool = False
    mxfp4: bool = False


class RoutedExperts(nn.Module):
    """This rank's slice of the routed experts, stacked: w13 [E_loc, 2I, D] (gate; up), w2 [E_loc, D, I],
    and with `bias` w13_bias [E_loc, 2I], w2_bias [E_loc, D]. `activation` and `limit` pick the GLU
    (tbo::moe_experts: "silu" or GPT-OSS's "gpt_oss"; limit > 0 clamps gate and up first)."""

    def __init__(self, num_local: int, dim: int, inter: int, dtype=None, *, bias: bool = False,
                 activation: str = "silu", limit: float = 0.0):
        super().__init__()
        if activation not in MOE_ACTIVATIONS:
            raise ValueError(f"expert activation {activation!r} not supported (have {', '.join(MOE_ACTIVATIONS)})")
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, dim, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_local, dim, inter, dtype=dtype))
        self.w13_bias = nn.Parameter(torch.empty(num_local, 2 * inter, dtype=dtype)) if bias else None
        self.w2_bias = nn.Parameter(torch.empty(num_local, dim, dtype=dtype)) if bias else None
        self.activation, self.limit = activation, float(limit)

    def forward(self, x_ND: Tensor, ids_NK: Tensor, w_NK: Tensor) -> Tensor:
        if self.w13_bias is None and self.activation == "silu" and not self.limit:
            return ops.moe_experts(x_ND, ids_NK, w_NK, self.w13, self.w2)  # the op's original arguments
        return ops.moe_experts(x_ND, ids_NK, w_NK, self.w13, self.w2, self.w13_bias, self.w2_bias,
                               self.activation, self.limit)


class SoftmaxTopkRouter(nn.Module):
    """Softmax over all experts (fp32), top-k, optionally renormalised over the k (Qwen3-MoE, Mixtral)."""

    def __init__(self, num_experts: int, dim: int, k: int, renormalize: bool, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim, dtype=dtype))
        self.k, self.norm = k, renormalize

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        # softmax, top-k and the renormalisation as one op (one launch on CUDA, not five)
        return torch.ops.tbo.route_topk(torch.ops.tbo.linear_f32(x_TD, self.weight), self.k, "softmax", self.norm)


class MoEBlock(nn.Module):
    """router(x_TD) -> (topk_ids_TK int64 global, topk_w_TK fp32); experts; optional shared MLP."""

    def __init__(self, router: nn.Module, num_experts: int, dim: int, inter: int,
                 par: ParallelConfig, shared: nn.Module | None = None, dtype=None, *,
                 expert_bias: bool = False, activation: str = "silu", limit: float = 0.0):
        super().__init__()
        if num_experts % par.ep_size:
            raise ValueError(f"{num_experts} experts do not divide over ep_size {par.ep_size}")
        self.gate = router
        self.num_experts = num_experts
        self.e_loc = num_experts // par.ep_size
        self.par = par
        self.experts = RoutedExperts(self.e_loc, dim, inter, dtype=dtype, bias=expert_bias,
                                     activation=activation, limit=limit)
        self.shared_experts = shared
        # the rank's first expert id as a buffer, not a Python int: a traced program stays valid
        # for every rank (the runtime binds each rank's value)
        self.register_buffer("expert_lo", torch.tensor(par.ep_rank * self.e_loc), persistent=False)

    def init_buffers(self) -> None:
        """Re-set the non-persistent buffer after `to_empty` (meta -> device)."""
        self.expert_lo = torch.tensor(self.par.ep_rank * self.e_loc, device=self.expert_lo.device)

    def _local(self, ids_TK: Tensor, w_TK: Tensor) -> tuple[Tensor, Tensor]:
        lo = self.expert_lo
        mine = (ids_TK >= lo) & (ids_TK < lo + self.e_loc)
        return torch.where(mine, ids_TK - lo, -1), torch.where(mine, w_TK, 0.0)

    def _shared(self, x_TD: Tensor) -> Tensor | None:
        return self.shared_experts(x_TD) if self.shared_experts is not None else None

    def forward(self, x_TD: Tensor, pad_T: Tensor) -> Tensor:
        par, W = self.par, self.par.ep_size
        if W == 1:
            shared = self._shared(x_TD)
            ids, w = self.gate(x_TD)
            y = self.experts(x_TD, ids, w)
        elif par.moe_comm == "a2a":
            ids, w = self.gate(x_TD)
            T, K = ids.shape
            send_x, send_meta = ops.dispatch_pack(x_TD, ids, w, W, self.e_loc)
            h = ops.dispatch_start(send_x, send_meta, par.group, W)
            shared = self._shared(x_TD)  # on the compute stream while the tokens travel
            rx, rmeta = ops.dispatch_wait(h, send_x, send_meta, par.group, W)
            ry = self.experts(rx, *unpack_meta(rmeta, K))
            h = ops.combine_start(ry, par.group, W)
            parts = ops.combine_wait(h, ry, par.group, W)
            y = parts.view(W, T, x_TD.shape[-1]).sum(0, dtype=torch.float32).to(x_TD.dtype)
        elif par.moe_comm == "allgather":
            x0 = torch.where(pad_T.unsqueeze(-1), 0.0, x_TD).to(x_TD.dtype)  # padding rows are zero
            h = ops.all_gather_start(x0, par.group, W)
            shared = self._shared(x_TD)
            gx = ops.all_gather_wait(h, x0, par.group, W)
            ids, w = self.gate(gx)
            lids, lw = self._local(ids, w)
            gy = self.experts(gx, lids, lw)
            h = ops.reduce_scatter_start(gy, par.group, W)
            y = ops.reduce_scatter_wait(h, gy, par.group, W)
        else:  # allreduce
            ids, w = self.gate(x_TD)
            lids, lw = self._local(ids, w)
            part = self.experts(x_TD, lids, lw)
            h = ops.all_reduce_start(part, par.group, W)
            shared = self._shared(x_TD)
            y = ops.all_reduce_wait(h, part, par.group, W)
        return y if shared is None else y + shared
