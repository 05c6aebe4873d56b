"""tbo.route_topk (router scores, top-k, weights in one op): the Triton kernel (interpreter on CPU,
compiled on the GPU) against the torch ops the models used before, and the op's own contract.

Scores are made distinct (a permutation of well-spaced values plus noise), so the top-k is unique
and the ids must agree exactly; the weights agree to fp32 rounding (another summation order)."""
from __future__ import annotations

import pytest
import torch

import tbo_compiler.ops  # noqa: F401  (registers the tbo ops)
from tbo_compiler.runtime import kernels
from tbo_compiler.runtime.kernels import torch_ref
from tbo_compiler.runtime.kernels import triton_route as tr

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def distinct_logits(T, E, device=DEV, seed=0, scale=0.05):
    """[T, E] fp32 logits with no two equal in a row (gaps >= scale / 2)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]) if T else torch.empty(0, E)
    x = (ranks.float() - E / 2) * scale + torch.rand(T, E, generator=g) * scale / 4
    return x.to(device)


def reference(logits, k, scoring, renormalize):
    """The models' former torch code, in float64 (so the comparison bound is the kernel's alone)."""
    ids, w = torch_ref.route_topk(logits.double(), k, scoring, renormalize)
    return ids, w


def check(logits, k, scoring, renormalize):
    ids, w = tr.route_topk(logits, k, scoring, renormalize)
    want_ids, want_w = reference(logits, k, scoring, renormalize)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert ids.shape == w.shape == (logits.shape[0], k)
    assert torch.equal(ids.cpu(), want_ids.cpu())
    torch.testing.assert_close(w.double().cpu(), want_w.cpu(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (37, 128, 8), (64, 32, 4), (5, 130, 6), (3, 2, 2)])
def test_softmax_then_topk(T, E, k, renormalize):
    check(distinct_logits(T, E), k, "softmax", renormalize)


@pytest.mark.parametrize("T,E,k", [(1, 32, 4), (70, 32, 4), (9, 8, 8), (4, 1, 1)])
def test_topk_then_softmax(T, E, k):
    check(distinct_logits(T, E), k, "topk_softmax", False)


def test_row_stride_and_empty():
    wide = distinct_logits(12, 80)
    check(wide[:, :64], 4, "softmax", True)  # a slice: rows 80 apart, read in place
    ids, w = tr.route_topk(torch.empty(0, 16, device=DEV), 3)
    assert ids.shape == w.shape == (0, 3)


def test_equal_scores_take_the_lower_id_first():
    logits = torch.zeros(3, 16, device=DEV)
    logits[:, 5] = logits[:, 9] = 1.0  # two best, equal
    ids, w = tr.route_topk(logits, 4, "softmax", True)
    assert ids[:, :2].tolist() == [[5, 9]] * 3 and ids[:, 2:].tolist() == [[0, 1]] * 3
    assert torch.allclose(w.sum(-1).cpu(), torch.ones(3))


def test_supported_and_errors():
    x = distinct_logits(4, 32)
    assert tr.supported(x, 4, "softmax", True)
    assert not tr.supported(x.half(), 4)                # fp32 logits only
    assert not tr.supported(x, 33)                      # k > E
    assert not tr.supported(x, 4, "sigmoid")            # unknown scoring
    assert not tr.supported(x.t(), 2)                   # last dim not contiguous
    with pytest.raises(ValueError, match="scoring"):
        tr.route_topk(x, 2, "sigmoid")
    with pytest.raises(ValueError, match="scoring"):
        torch_ref.route_topk(x.cpu(), 2, "sigmoid")


def test_op_on_cpu_is_the_torch_code_and_fake_shapes():
    x = distinct_logits(6, 32, "cpu")
    ids, w = torch.ops.tbo.route_topk(x, 4, "softmax", True)
    w_ref, ids_ref = x.softmax(-1).topk(4, dim=-1)
    assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref / w_ref.sum(-1, keepdim=True))
    assert kernels.select("route_topk", (x, 4, "softmax", True))[0] == "torch"
    with torch._subclasses.FakeTensorMode():
        fi, fw = torch.ops.tbo.route_topk(torch.empty(5, 128), 8)
        assert fi.shape == fw.shape == (5, 8) and fi.dtype == torch.int64 and fw.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="CUDA")
@pytest.mark.parametrize("T,E,k,scoring,renorm", [(4096, 128, 8, "softmax", True), (256, 32, 4, "topk_softmax", False),
                                                  (4096, 8, 2, "softmax", True), (1, 128, 8, "softmax", False)])
def test_gpu_selected_and_agrees(T, E, k, scoring, renorm):
    x = distinct_logits(T, E, "cuda", scale=0.02)
    assert kernels.select("route_topk", (x, k, scoring, renorm))[0] == "triton"
    ids, w = torch.ops.tbo.route_topk(x, k, scoring, renorm)
    want_ids, want_w = reference(x, k, scoring, renorm)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w.double(), want_w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("tile", [(1, 1), (2, 2), (8, 4), (32, 1)])
def test_every_tile_gives_the_same_choice(tile):
    """The bench's sweep (bench/moe_bench.py --route) times each (rows a program, warps): each must
    compute the same routing, rows past T included (a tile wider than the last rows)."""
    logits = distinct_logits(37, 128, seed=3)
    ids, w = tr.route_topk(logits, 8, "softmax", True, tile=tile)
    want_ids, want_w = reference(logits, 8, "softmax", True)
    assert torch.equal(ids.cpu(), want_ids.cpu())
    torch.testing.assert_close(w.double().cpu(), want_w.cpu(), rtol=2e-6, atol=1e-7)


def test_tiles_rule_and_legacy(monkeypatch):
    for T in (1, 64, 256, 4096, 16384):
        for E in (2, 8, 16, 32, 60, 128, 256, 512, 1000):  # the measured widths and the rule's
            bt, nw = tr.tiles(T, E)
            e_p2 = max(2, 1 << (E - 1).bit_length())
            assert bt >= 1 and bt * e_p2 <= tr._TILE and nw in (1, 2, 4, 8)
    monkeypatch.setenv("TBO_ROUTE_TILES", "legacy")
    assert tr.tiles(256, 128) == (32, 4)  # the first rule: 8 programs of 32 rows at Qwen3's decode 256
    monkeypatch.setenv("TBO_ROUTE_TILES", "fast")
    with pytest.raises(Exception, match="TBO_ROUTE_TILES='fast' must be one of auto, legacy"):
        tr.tiles(256, 128)
