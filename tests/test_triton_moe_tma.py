"""The TMA variant of the fused MoE experts (runtime/kernels/triton_moe_tma.py) against the float64
per-expert reference of test_triton_moe.py.

On CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1; it implements tensor
descriptors, out-of-range tile elements read as zero as on the GPU): fp32 and fp16, both the plain
and the swapped (decode) MMA orientation, ragged dims, several blocks per expert, biases and the
GPT-OSS activation, each also with the A tiles loaded straight from x (gather_a), and the tuner's
gather_a candidates at their real tiles. On the GPU (bf16, every tuner config at the three models'
expert dims): tests/test_moe_tuning.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tbo_compiler.runtime.kernels import triton_moe as tm
from tbo_compiler.runtime.kernels import triton_moe_tma as tt

from test_triton_moe import TOL, make, reference

GPU = torch.cuda.is_available()


def _tiny(swap: bool, block_m: int = 16, half_tail: bool = False, persistent: bool = False,
          quarter_tail: bool = False, gather_a: bool = False) -> tt.TmaConfig:
    return tt.TmaConfig(block_m, tm.GemmTile(32, 32, 4, 1), tm.GemmTile(32, 32, 4, 1), swap=swap,
                        half_tail=half_tail, group_m=2, block_d=32, persistent=persistent,
                        quarter_tail=quarter_tail, gather_a=gather_a)


def _check(args, cfg):
    out = tt.moe_experts_tma(*args, config=cfg)
    x = args[0]
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = reference(*args)
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * max(float(ref.abs().max()), 1e-30))


@pytest.mark.skipif(GPU, reason="interpreter check; the GPU check is in test_moe_tuning.py")
@pytest.mark.parametrize("gather_a", [False, True])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_path_matches_reference(swap, dtype, gather_a):
    """D, I not multiples of the tiles (zero-padded K tail, N tiles past I and D), an empty
    expert, half the pairs not ours, more than one block for some experts."""
    args = make(40, 72, 40, 5, 3, dtype, p_invalid=0.3, drop_expert=2, seed=3)
    assert tt.supported(*args)
    _check(args, _tiny(swap, gather_a=gather_a))


@pytest.mark.skipif(GPU, reason="interpreter check; the GPU check is in test_moe_tuning.py")
@pytest.mark.parametrize("gather_a", [False, True])
def test_half_height_tail_blocks(gather_a):
    """32-row blocks whose experts' last blocks hold <= 16 rows run the 16-row tile (and > 16 the
    full one): both kinds occur with these counts (about 19 rows an expert, some 40+)."""
    args = make(64, 64, 48, 6, 2, torch.float32, p_invalid=0.1, seed=6)
    ids = args[1]
    counts = torch.bincount(ids[ids >= 0], minlength=6) % 32
    assert ((counts > 0) & (counts <= 16)).any() and (counts > 16).any()
    _check(args, _tiny(False, block_m=32, half_tail=True, gather_a=gather_a))


@pytest.mark.skipif(GPU, reason="interpreter check; the GPU check is in test_moe_tuning.py")
@pytest.mark.parametrize("persistent,gather_a", [(False, False), (True, False), (True, True)])
def test_quarter_height_swapped_tail_blocks(persistent, gather_a):
    """64-row blocks: last blocks of <= 16 rows run the swapped 16-row tile, 17..32 the half tile,
    more the full one; all three occur with these counts."""
    args = make(128, 64, 48, 5, 3, torch.float32, p_invalid=0.05, seed=4)
    ids = args[1]
    tails = torch.bincount(ids[ids >= 0], minlength=5) % 64
    assert ((tails > 0) & (tails <= 16)).any() and ((tails > 16) & (tails <= 32)).any() and (tails > 32).any(), tails
    _check(args, _tiny(False, block_m=64, half_tail=True, quarter_tail=True, persistent=persistent, gather_a=gather_a))


@pytest.mark.skipif(GPU, reason="interpreter check; the GPU check is in test_moe_tuning.py")
@pytest.mark.parametrize("gather_a", [False, True])
def test_persistent_programs_cover_every_tile(gather_a):
    """Persistent launch (4 programs on CPU, looping over ~40 output tiles, blocks without an
    expert skipped inside the loop), with half-height tail blocks: same result."""
    args = make(64, 64, 48, 6, 2, torch.float32, p_invalid=0.1, drop_expert=3, seed=6)
    _check(args, _tiny(False, block_m=32, half_tail=True, persistent=True, gather_a=gather_a))


@pytest.mark.skipif(GPU, reason="interpreter check; the GPU check is in test_moe_tuning.py")
@pytest.mark.parametrize("swap,gather_a", [(True, False), (False, True)])
def test_tma_path_biases_and_gpt_oss_activation(swap, gather_a):
    args = make(24, 64, 48, 4, 2, torch.float32, p_invalid=0.2, seed=4)
    g = torch.Generator().manual_seed(5)
    b13 = torch.randn(4, 96, generator=g)
    b2 = torch.randn(4, 64, generator=g)
    out = tt.moe_experts_tma(*args, b13, b2, "gpt_oss", 1.5, config=_tiny(swap, gather_a=gather_a))
    ref = reference(*args, b13, b2, "gpt_oss", 1.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.skipif(GPU, reason="interpreter check; the GPU check is in test_moe_tuning.py")
@pytest.mark.parametrize("name", [n for n, c in tt.CONFIGS.items() if c.gather_a])
def test_gather_a_candidates(name):
    """The tuner's gather_a candidates at their real tiles: each is its gathered twin plus gather_a
    (named "<twin>_ga"), and matches the reference on rows of x that are not contiguous (a column
    slice), D = 136 not a multiple of BK (the masked K tail), an expert with a 12-row last block
    (half tile) and two with 100+ rows."""
    cfg = tt.CONFIGS[name]
    assert dataclasses.replace(tt.CONFIGS[name.removesuffix("_ga")], gather_a=True) == cfg
    x, *rest = make(200, 136, 72, 3, 2, torch.float32, p_invalid=0.1, seed=0)
    assert torch.bincount(rest[0][rest[0] >= 0], minlength=3).tolist() == [140, 113, 108]
    wide = torch.zeros(200, 160)
    wide[:, :136] = x
    _check((wide[:, :136], *rest), cfg)


def test_tma_refuses_unaligned_rows():
    """Descriptor rows must be multiples of 16 bytes: D = 36 in fp16 is not offered."""
    args = make(8, 36, 16, 2, 2, torch.float16, device="cuda" if GPU else "cpu")
    assert not tt.supported(*args)


def test_rows_not_contiguous_are_not_offered():
    """The gather pass reads x's rows as contiguous: an x whose last dim is strided is left to the
    other candidates (the tuner offers TMA configs only where `supported`)."""
    x, *rest = make(16, 64, 32, 4, 2, torch.float32, seed=1)
    assert tt.supported(x, *rest) == (not GPU)  # fp32 runs only in the interpreter
    assert not tt.supported(x.t().contiguous().t(), *rest)
