"""Fake `mori.ops`: EpDispatchCombineOp moving tokens over the shmem process group (gloo here).

Contract (python/mori/ops/dispatch_combine.py, docs/MORI-EP-GUIDE.md):
  dispatch(input [T, hidden_dim], weights fp32 [T, K], scales [T, scale_dim] (elements of
      scale_type_size bytes), indices int32 [T, K] in [0, world * num_experts_per_rank))
      -> (out [max_recv, hidden], out_weights fp32 [max_recv, K], out_scales [max_recv, scale_dim],
          out_indices int32 [max_recv, K], total_recv int32 [1]); max_recv = world * max tokens.
      A token goes once to every rank owning one of its experts (expert e on rank
      e // num_experts_per_rank); rows < total_recv of the receiver's buffers hold the received
      tokens, with their source's weights, scales and (global) indices, in an order of mori's own
      (here a seeded shuffle); later rows are stale. The outputs are views of buffers the op owns:
      the next exchange on the op overwrites them.
  combine(input [>= total_recv, hidden] in the receive order, weights (None), indices: the same
      [T, K] indices dispatch got) -> (out [max tokens, hidden]: row t = the sum of the rows of
      every rank token t went to, unweighted, out_weights or None).
  AsyncLL (split phase): dispatch / dispatch_send launch the send half only; the outputs are
      valid after dispatch_recv(); likewise combine_send / combine_recv. Other kernel types
      complete in dispatch / combine (their *_recv raise). reset() between exchanges: a dispatch
      on an op whose last exchange was not reset, or any call out of this order, is refused.
Ops are made collectively (mori synchronises and barriers in the constructor).
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fakes import check
from fakes.mori import CALLS
from fakes.mori.shmem import STATE as SHMEM


class EpDispatchCombineKernelType(enum.Enum):
    IntraNode = 0
    InterNode = 1
    InterNodeV1 = 2
    InterNodeV1LL = 3
    AsyncLL = 4
    IntraNodeLL = 5


@dataclass
class EpDispatchCombineConfig:
    data_type: torch.dtype
    rank: int
    world_size: int
    hidden_dim: int
    scale_dim: int
    scale_type_size: int
    max_token_type_size: int
    max_num_inp_token_per_rank: int
    num_experts_per_rank: int
    num_experts_per_token: int
    warp_num_per_block: int = 8
    block_num: int = 80
    max_total_recv_tokens: int = 0
    use_external_inp_buf: bool = True
    kernel_type: EpDispatchCombineKernelType = EpDispatchCombineKernelType.IntraNode
    gpu_per_node: int = 8
    rdma_block_num: int = 0
    num_qp_per_pe: int = 1
    quant_type: str = "none"


_UIDS = itertools.count()
_STALE_INT = 0  # stale rows read as "expert 0 on rank 0, local id 0": a backend must not trust them


class EpDispatchCombineOp:
    def __init__(self, config: EpDispatchCombineConfig):
        check("pg" in SHMEM, "EpDispatchCombineOp before mori.shmem is initialised")
        c = self.config = config
        self.pg = SHMEM["pg"]
        check(isinstance(c.kernel_type, EpDispatchCombineKernelType), "kernel_type: an EpDispatchCombineKernelType")
        check(c.rank == dist.get_rank(self.pg) and c.world_size == dist.get_world_size(self.pg),
              f"rank {c.rank} / world_size {c.world_size} do not match the shmem process group")
        for name in ("hidden_dim", "max_num_inp_token_per_rank", "num_experts_per_rank", "num_experts_per_token"):
            check(isinstance(getattr(c, name), int) and getattr(c, name) > 0, f"{name}: a positive int")
        check(c.scale_dim >= 0 and c.scale_type_size in (0, 1, 2, 4), "scale_dim / scale_type_size")
        self.uid = next(_UIDS)
        self._log("__init__", config=c)
        dist.barrier(group=self.pg)  # collective, like mori's constructor
        W, Tm, D, K = c.world_size, c.max_num_inp_token_per_rank, c.hidden_dim, c.num_experts_per_token
        self.max_recv = W * Tm
        self.out = torch.full((self.max_recv, D), float("nan"), dtype=c.data_type)
        self.out_weights = torch.full((self.max_recv, K), 1.0)
        self.out_indices = torch.full((self.max_recv, K), _STALE_INT, dtype=torch.int32)
        self.out_scales: dict = {}
        self.total = torch.zeros(1, dtype=torch.int32)
        self.comb_out = torch.full((Tm, D), float("nan"), dtype=c.data_type)
        self.stage, self.exchanges = "idle", 0
        self._pending = None

    # -- helpers
    def _log(self, fn, **args):
        CALLS.append({"op": self.uid, "fn": fn, "args": args})

    def _split(self) -> bool:
        return self.config.kernel_type is EpDispatchCombineKernelType.AsyncLL

    def _expect(self, stage: str, fn: str):
        check(self.stage == stage, f"op {self.uid}: {fn} in stage {self.stage!r} (needs {stage!r})")

    def _scales_buffer(self, dtype):
        if dtype not in self.out_scales:
            self.out_scales[dtype] = torch.full((self.max_recv, self.config.scale_dim), _STALE_INT, dtype=dtype)
        return self.out_scales[dtype]

    # -- dispatch
    def dispatch(self, input, weights, scales, indices, block_num=-1, rdma_block_num=-1, warp_per_block=-1,
                 call_local_expert_count=False, *, routing=None, return_routing=False):
        self._log("dispatch", input=input, weights=weights, scales=scales, indices=indices)
        return self._dispatch(input, weights, scales, indices)

    def dispatch_send(self, input, weights, scales, indices, block_num=-1, warp_per_block=-1,
                      call_local_expert_count=False):
        self._log("dispatch_send", input=input, weights=weights, scales=scales, indices=indices)
        return self._dispatch(input, weights, scales, indices)

    def _dispatch(self, input, weights, scales, indices):
        c = self.config
        self._expect("idle", "dispatch")
        K, W, E = c.num_experts_per_token, c.world_size, c.num_experts_per_rank
        check(input.dim() == 2 and input.shape[1] == c.hidden_dim and input.is_floating_point(),
              f"input [T, {c.hidden_dim}] float, got {tuple(input.shape)} {input.dtype}")
        T = input.shape[0]
        check(T <= c.max_num_inp_token_per_rank, f"{T} tokens > max_num_inp_token_per_rank")
        check(input.element_size() <= c.max_token_type_size, "input dtype wider than max_token_type_size")
        check(indices.dtype == torch.int32 and tuple(indices.shape) == (T, K), f"indices int32 [{T}, {K}]")
        check(bool(((indices >= 0) & (indices < W * E)).all()), "indices outside [0, world * num_experts_per_rank)")
        check(weights is not None and weights.dtype == torch.float32 and tuple(weights.shape) == (T, K),
              f"weights fp32 [{T}, {K}]")
        if c.scale_dim > 0:
            check(scales is not None and tuple(scales.shape) == (T, c.scale_dim)
                  and scales.element_size() == c.scale_type_size,
                  f"scales [{T}, {c.scale_dim}] of {c.scale_type_size}-byte elements")
        for t in (input, weights, indices) + ((scales,) if c.scale_dim > 0 else ()):
            check(t.is_contiguous(), "inputs must be contiguous")
        # every rank sees every rank's tokens; each keeps those routed to it, once per token
        mine = dict(x=input.clone(), w=weights.clone(), s=scales.clone() if c.scale_dim > 0 else None,
                    i=indices.clone())
        everyone = [None] * W
        dist.all_gather_object(everyone, mine, group=self.pg)
        rows = []
        for src, d in enumerate(everyone):
            dest = d["i"].long() // E
            for t in range(d["x"].shape[0]):
                if bool((dest[t] == c.rank).any()):
                    rows.append((src, t))
        g = torch.Generator().manual_seed(1000 * c.rank + self.exchanges)
        rows = [rows[k] for k in torch.randperm(len(rows), generator=g).tolist()]
        self._pending = dict(rows=rows, everyone=everyone, indices=indices.clone(), T=T,
                             scale_dtype=scales.dtype if c.scale_dim > 0 else None)
        if self._split():
            self.stage = "sent"
        else:
            self._receive()
        return (self.out, self.out_weights,
                self._scales_buffer(scales.dtype) if c.scale_dim > 0 else None, self.out_indices, self.total)

    def _receive(self):
        p = self._pending
        for i, (src, t) in enumerate(p["rows"]):
            d = p["everyone"][src]
            self.out[i] = d["x"][t].to(self.out.dtype)
            self.out_weights[i] = d["w"][t]
            self.out_indices[i] = d["i"][t]
            if d["s"] is not None:
                self._scales_buffer(p["scale_dtype"])[i] = d["s"][t]
        self.total[0] = len(p["rows"])
        self.stage = "dispatched"

    def dispatch_recv(self, block_num=-1, warp_per_block=-1, call_local_expert_count=False):
        self._log("dispatch_recv")
        check(self._split(), "dispatch_recv only supports AsyncLL")
        self._expect("sent", "dispatch_recv")
        self._receive()

    # -- combine
    def combine(self, input, weights, indices, block_num=-1, rdma_block_num=-1, warp_per_block=-1,
                use_external_inp_buf=-1, call_reset=False, *, routing=None):
        self._log("combine", input=input, weights=weights, indices=indices)
        out = self._combine(input, weights, indices)
        if call_reset:
            self.reset()
        return out

    def combine_send(self, input, weights, indices, block_num=-1, warp_per_block=-1):
        self._log("combine_send", input=input, weights=weights, indices=indices)
        return self._combine(input, weights, indices)

    def _combine(self, input, weights, indices):
        c, p = self.config, self._pending
        self._expect("dispatched", "combine")
        n = len(p["rows"])
        check(input.dim() == 2 and input.shape[1] == c.hidden_dim and input.shape[0] >= n,
              f"input [>= {n}, {c.hidden_dim}], got {tuple(input.shape)}")
        check(weights is None or (weights.dtype == torch.float32 and weights.shape[0] >= n), "weights fp32 or None")
        check(isinstance(indices, torch.Tensor) and torch.equal(indices, p["indices"]),
              "combine's indices must be the ones this op's dispatch got")
        back = {}
        for i, (src, t) in enumerate(p["rows"]):
            back.setdefault(src, []).append((t, input[i].clone()))
        everyone = [None] * c.world_size
        dist.all_gather_object(everyone, back, group=self.pg)
        acc = torch.zeros(p["T"], c.hidden_dim, dtype=torch.float32)
        for d in everyone:  # rank order: the same float sum as the slab backends' sum over W slabs
            for t, row in d.get(c.rank, []):
                acc[t] += row.float()
        self._pending["combined"] = acc.to(input.dtype)
        if self._split():
            self.stage = "combine_sent"
        else:
            self._combined()
        return self.comb_out, None

    def _combined(self):
        res = self._pending["combined"]
        self.comb_out[: res.shape[0]] = res
        self.stage = "combined"

    def combine_recv(self, block_num=-1, warp_per_block=-1):
        self._log("combine_recv")
        check(self._split(), "combine_recv only supports AsyncLL")
        self._expect("combine_sent", "combine_recv")
        self._combined()

    def reset(self):
        self._log("reset")
        check(self.stage in ("combined", "idle"), f"op {self.uid}: reset in the middle of an exchange ({self.stage})")
        self.stage, self._pending = "idle", None
        self.exchanges += 1
