"""Fake `aiter.fused_moe.fused_moe`.

Contract (aiter/fused_moe.py): hidden_states [M, D]; w1 [E, 2I, D] (gate rows, then up rows),
w2 [E, D, I], both of hidden_states' dtype when unquantized (QuantType.No); topk_ids int32 [M, K],
topk_weight fp32 [M, K]; expert_mask (EP) int32 [global_E] of 0/1 with E ones: ids index it, and
a local expert's weights are found by the mask's prefix sum; pairs on masked-out experts add
nothing. Output [M, D] in hidden_states' dtype, sum over k of weight * expert(x).
"""
from __future__ import annotations

import torch

from fakes import check
from fakes.aiter import CALLS, ActivationType, QuantType

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # fp32: the CPU stand-in's extra


def fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=None, activation=ActivationType.Silu,
              quant_type=QuantType.No, doweight_stage1=False, w1_scale=None, w2_scale=None, a1_scale=None,
              a2_scale=None, block_size_M=None, num_local_tokens=None, moe_sorting_dispatch_policy=0,
              dtype=None, hidden_pad=0, intermediate_pad=0, bias1=None, bias2=None):
    from tbo_compiler.runtime.kernels import torch_ref

    CALLS.append({"fn": "fused_moe", "args": dict(locals())})
    x = hidden_states
    check(x.dim() == 2 and x.dtype in _DTYPES, f"hidden_states [M, D] float, got {tuple(x.shape)} {x.dtype}")
    M, D = x.shape
    check(w1.dim() == 3 and w2.dim() == 3 and w1.shape[0] == w2.shape[0], "w1 [E, 2I, D], w2 [E, D, I]")
    E, I2, D1 = w1.shape
    check(D1 == D and I2 % 2 == 0 and tuple(w2.shape[1:]) == (D, I2 // 2),
          f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} for hidden {D}")
    check(w1.dtype == w2.dtype == x.dtype, "unquantized weights in the activations' dtype")
    check(topk_ids.dtype == torch.int32 and topk_ids.dim() == 2 and topk_ids.shape[0] == M, "topk_ids int32 [M, K]")
    check(topk_weight.dtype == torch.float32 and topk_weight.shape == topk_ids.shape, "topk_weight fp32 [M, K]")
    check(activation is ActivationType.Silu and quant_type is QuantType.No, "SwiGLU, unquantized")
    check(all(t is None for t in (w1_scale, w2_scale, a1_scale, a2_scale, bias1, bias2)), "no scales, no biases")
    if expert_mask is None:
        mask = torch.ones(E, dtype=torch.int32, device=x.device)
    else:
        mask = expert_mask
        check(mask.dtype == torch.int32 and mask.dim() == 1, "expert_mask int32 [global_E]")
        check(bool(((mask == 0) | (mask == 1)).all()) and int(mask.sum()) == E, f"expert_mask must mark {E} experts")
    check(bool(((topk_ids >= 0) & (topk_ids < mask.numel())).all()), "topk_ids outside [0, global_E)")
    local = torch.cumsum(mask, 0) - 1
    ids = torch.where(mask[topk_ids.long()] == 1, local[topk_ids.long()], -1)
    return torch_ref.moe_experts(x, ids, topk_weight, w1, w2)
