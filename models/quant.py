"""Weight formats of quantized checkpoints: quantize (the tiny maker) and dequantize (the loader).

Legend: O out features, I in features (a Linear weight is [O, I]).

fp8 block (DeepSeek-V3): `X.weight` float8_e4m3fn [O, I] and `X.weight_scale_inv` fp32
    [ceil(O/bo), ceil(I/bi)], one scale per bo x bi block (128 x 128); w = q * scale_inv.
    Edge blocks are partial when O or I is not a multiple of the block.
int4 pack-quantized (compressed-tensors, symmetric, group strategy; Kimi K2.5 routed experts):
    `X.weight_packed` int32 [O, ceil(I/8)], eight 4-bit values per int32, lowest nibble first,
    each stored unsigned as q + 8 (q in [-8, 7]); `X.weight_scale` bf16 [O, ceil(I/group)];
    `X.weight_shape` [2] = (O, I). w = q * scale of the value's group along I.
MXFP4 (OCP microscaling; GPT-OSS experts): `X_blocks` uint8 [..., O, I/32, 16] holds 32 FP4 (E2M1)
    values per block, two per byte, low nibble first; `X_scales` uint8 [..., O, I/32] one E8M0
    exponent per block. w = FP4[nibble] * 2^(scale - 127), FP4 = [0, .5, 1, 1.5, 2, 3, 4, 6] and
    the same negated for nibbles 8-15 (bit 3 is the sign).
"""
from __future__ import annotations

import torch
from torch import Tensor

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _expand(s_RC: Tensor, shape: tuple[int, int], block: tuple[int, int]) -> Tensor:
    """Per-block values -> per-element [O, I], cutting the partial edge blocks."""
    return s_RC.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def fp8_scale_shape(shape, block=(128, 128)) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def quantize_fp8_block(w_OI: Tensor, block=(128, 128)) -> tuple[Tensor, Tensor]:
    O, I = w_OI.shape
    R, C = fp8_scale_shape(w_OI.shape, block)
    w = torch.zeros(R * block[0], C * block[1], dtype=torch.float32)
    w[:O, :I] = w_OI.float()
    amax = w.view(R, block[0], C, block[1]).abs().amax(dim=(1, 3))
    scale_inv = (amax / FP8_MAX).clamp(min=1e-12)  # all-zero blocks keep a finite scale
    q = (w_OI.float() / _expand(scale_inv, (O, I), block)).to(torch.float8_e4m3fn)
    return q, scale_inv


def dequantize_fp8_block(q_OI: Tensor, scale_inv: Tensor, block=(128, 128)) -> Tensor:
    return q_OI.float() * _expand(scale_inv.float(), tuple(q_OI.shape), block)


def pack_int4(q_OI: Tensor) -> Tensor:
    """int values in [-8, 7] -> int32 [O, ceil(I/8)]."""
    O, I = q_OI.shape
    u = torch.zeros(O, -(-I // 8) * 8, dtype=torch.int64)
    u[:, :I] = q_OI.long() + 8  # padding nibbles stay 0, as compressed-tensors writes them
    word = (u.view(O, -1, 8) << (4 * torch.arange(8))).sum(-1)  # < 2**32, exact in int64
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # wrap to signed


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """int32 [O, ceil(I/8)] -> int8 values in [-8, 7], [O, I]."""
    u = (packed.long().unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    return (u.flatten(1)[:, :in_features] - 8).to(torch.int8)


def quantize_int4_group(w_OI: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """-> (weight_packed int32, weight_scale bf16, weight_shape int64 [2])."""
    O, I = w_OI.shape
    G = -(-I // group_size)
    w = torch.zeros(O, G * group_size)
    w[:, :I] = w_OI.float()
    # scale is rounded to bf16 first so quantization uses the scale the loader will see
    scale = (w.view(O, G, group_size).abs().amax(-1) / 7).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(w_OI.float() / _expand(scale.float(), (O, I), (1, group_size))).clamp(-8, 7)
    return pack_int4(q), scale, torch.tensor([O, I], dtype=torch.int64)


def dequantize_int4_group(packed: Tensor, scale: Tensor, shape, group_size: int = 32) -> Tensor:
    O, I = (int(s) for s in shape)
    q = unpack_int4(packed, I).float()
    return q * _expand(scale.float(), (O, I), (1, group_size))


# MXFP4 ------------------------------------------------------------------------------------------

MXFP4_BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor) -> Tensor:
    """uint8 blocks [..., G, 16] and scales [..., G] -> fp32 [..., G * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).flatten(-2)            # [..., G, 32]
    exp = scales.to(torch.float32) - 127
    return (vals * torch.exp2(exp).unsqueeze(-1)).flatten(-2)


def quantize_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 [..., I] (I a multiple of 32) -> (blocks uint8 [..., I/32, 16], scales uint8 [..., I/32]).
    The block exponent makes the block's largest magnitude fit 6 (FP4's largest); values round to
    the nearest FP4 value."""
    if w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of {MXFP4_BLOCK}, got {w.shape[-1]}")
    x = w.float().unflatten(-1, (-1, MXFP4_BLOCK))                                  # [..., G, 32]
    amax = x.abs().amax(-1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = x / torch.exp2(exp).unsqueeze(-1)
    mags = torch.tensor(FP4_VALUES[:8])
    idx = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(-1)                      # nearest magnitude
    nib = (idx + 8 * (scaled < 0)).to(torch.uint8)
    blocks = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)
