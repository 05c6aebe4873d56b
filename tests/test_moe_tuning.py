"""moe_experts by measurement (runtime/kernels/moe_tuned.py) and its grouped-GEMM candidate.

The grouped-GEMM path (triton_moe.moe_experts_grouped) is checked against the float64 per-expert
reference of test_triton_moe.py: on CPU with torch's own _grouped_mm and the combine kernel in
Triton's interpreter (fp32), on the GPU in bf16 at the real models' dims. The choosing logic
(fastest wins, stored per GPU, read back without measuring, off, captures, a failing candidate)
is checked with made-up timings: the timings are the only fake.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from test_triton_moe import DEV, GPU, TOL, make, reference

from tbo_compiler.runtime.kernels import moe_tuned as mt
from tbo_compiler.runtime.kernels import triton_moe as tm


def _close(out, args, tol):
    ref = reference(*args)
    scale = max(float(ref.abs().max()), 1e-30)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("activation,limit,bias", [("silu", 0.0, False), ("gpt_oss", 7.0, True)])
def test_grouped_path_matches_reference(activation, limit, bias):
    """Pairs not ours (-1), an expert with no rows, biases and the clamped activation: the sorted
    grouped GEMMs and the weighted combine give the per-expert float64 result."""
    dev = "cuda" if GPU else "cpu"
    dtype = torch.bfloat16 if GPU else torch.float32
    x, ids, w, w13, w2 = make(24, 32, 16, 4, 2, dtype, p_invalid=0.3, drop_expert=2, device=dev)
    b13 = torch.randn(4, 32, device=dev).to(dtype) if bias else None
    b2 = torch.randn(4, 32, device=dev).to(dtype) if bias else None
    args = (x, ids, w, w13, w2, b13, b2, activation, limit)
    out = tm.moe_experts_grouped(*args)
    assert out.shape == x.shape and out.dtype == x.dtype
    _close(out, args, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="CUDA")
@pytest.mark.parametrize("N,D,I,E,K", [(512, 2048, 768, 128, 8), (256, 2880, 2880, 32, 4), (64, 4096, 14336, 8, 2)])
def test_every_candidate_matches_reference_bf16(N, D, I, E, K):
    """Qwen3-30B-A3B, GPT-OSS-20B and Mixtral expert dims: each candidate the tuner may pick."""
    args = make(N, D, I, E, K, torch.bfloat16, p_invalid=0.0, device="cuda")
    ran = []
    for name, fn in mt.candidates(args).items():
        try:
            out = fn(*args)
        except Exception as e:  # a tile that does not fit is left out by the tuner, not a wrong answer
            print(f"{name} left out: {' '.join(str(e).split())[:160]}")
            continue
        _close(out, args, TOL[torch.bfloat16])
        ran.append(name)
    assert "triton_default" in ran and len(ran) > 1, ran


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """The tuner with its state reset, a tuning file under tmp_path, a GPU name, and candidates
    whose timings are given by the test (they compute nothing)."""
    monkeypatch.setattr(mt, "_CHOICE", {})
    monkeypatch.setattr(mt, "_FN", {})
    monkeypatch.setattr(mt, "_LOADED", [False])
    monkeypatch.setattr(mt, "_section", lambda: "FakeGPU | torch x | triton y")
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("TBO_MOE_TUNING", str(path))
    timings = {"triton_default": 3.0, "triton_bm128_n128": 1.0, "grouped_mm": 2.0}
    calls = []

    def cand(n):
        def fn(*a):
            if timings[n] is None:  # a tile that does not fit fails on its first (warm-up) call
                raise RuntimeError("out of shared memory")
            return n
        return fn

    def cands(args):
        return {n: cand(n) for n in timings}

    def time_ms(fn, args):
        calls.append(fn())
        return timings[fn()]

    monkeypatch.setattr(mt, "candidates", cands)
    monkeypatch.setattr(mt, "time_ms", time_ms)
    # the timed call is the candidate itself, not a CUDA graph of it: on a GPU the graph's replay
    # would return None where the made-up timings need the candidate's name
    monkeypatch.setattr(mt, "replayer", lambda fn, args: lambda: fn(*args))
    return path, timings, calls


def _args():
    return make(8, 16, 8, 2, 2, torch.float32, device=DEV)  # the real kernel runs where the tests do


def test_fastest_is_chosen_stored_and_read_back_without_measuring(fake_gpu, monkeypatch):
    path, timings, calls = fake_gpu
    args = _args()
    assert mt.moe_experts(*args) == "triton_bm128_n128"
    # each candidate ROUNDS times, then the CONFIRM (here all three) fastest in turn CONFIRM_ROUNDS times
    n = len(timings) * (mt.ROUNDS + mt.CONFIRM_ROUNDS)
    assert sorted(calls) == sorted(list(timings) * (mt.ROUNDS + mt.CONFIRM_ROUNDS))
    assert calls[-3:] == ["triton_bm128_n128", "grouped_mm", "triton_default"]  # interleaved, fastest first
    assert mt.moe_experts(*args) == "triton_bm128_n128" and len(calls) == n  # not again
    data = json.loads(path.read_text())
    assert data == {"FakeGPU | torch x | triton y": {mt.shape_key(args): "triton_bm128_n128"}}
    # a new process: the file answers, nothing is measured
    monkeypatch.setattr(mt, "_CHOICE", {})
    monkeypatch.setattr(mt, "_FN", {})
    monkeypatch.setattr(mt, "_LOADED", [False])
    calls.clear()
    assert mt.moe_experts(*args) == "triton_bm128_n128" and calls == []


def test_off_measures_nothing(fake_gpu, monkeypatch):
    path, _, calls = fake_gpu
    monkeypatch.setenv("TBO_MOE_TUNING", "off")  # the fused kernel's default tiles, computed for real
    args = _args()
    torch.testing.assert_close(mt.moe_experts(*args), tm.moe_experts(*args))
    assert calls == [] and not path.exists()


def test_no_measuring_inside_a_capture(fake_gpu, monkeypatch):
    _, _, calls = fake_gpu
    monkeypatch.setattr(mt, "_capturing", lambda: True)
    assert mt.moe_experts(*_args()) == "triton_default" and calls == []
    assert mt._FN == {}  # the capture's default is not kept: the warm-up outside a capture measures


def test_failing_candidate_left_out_and_damaged_file_measured_again(fake_gpu, caplog):
    path, timings, _ = fake_gpu
    timings["triton_bm128_n128"] = None
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert mt.moe_experts(*_args()) == "grouped_mm"
    assert "unreadable" in caplog.text
    assert list(json.loads(path.read_text()).values()) == [{mt.shape_key(_args()): "grouped_mm"}]


def test_the_interleaved_confirmation_decides(fake_gpu, monkeypatch):
    """A candidate fastest when timed alone but not when timed in turn with the others (a GPU that
    heats up) is not chosen: the confirmation's times decide."""
    _, timings, _ = fake_gpu
    first = {"triton_default": 3.0, "triton_bm128_n128": 1.0, "grouped_mm": 2.0}
    then = {"triton_default": 3.0, "triton_bm128_n128": 3.1, "grouped_mm": 2.0}
    seen = []

    def time_ms(fn, args):
        n = fn()
        seen.append(n)
        return (first if len(seen) <= len(timings) * mt.ROUNDS else then)[n]
    monkeypatch.setattr(mt, "time_ms", time_ms)
    assert mt.moe_experts(*_args()) == "grouped_mm"
    key = mt.shape_key(_args())
    assert mt.TIMES[key]["triton_bm128_n128"] == 1.0 and mt.TIMES[key]["triton_bm128_n128 (confirm)"] == 3.1


def test_a_gain_inside_the_noise_keeps_the_default(fake_gpu):
    _, timings, _ = fake_gpu
    timings.update(triton_bm128_n128=2.9, grouped_mm=2.95)  # under MARGIN faster than 3.0
    assert mt.moe_experts(*_args()) == "triton_default"


def test_shape_key_names_what_changes_the_choice():
    x, ids, w, w13, w2 = _args()
    k = mt.shape_key((x, ids, w, w13, w2))
    assert k == "N8_D16_I8_E2_K2_float32_b00_silu_l0"
    assert mt.shape_key((x, ids, w, w13, w2, None, None, "gpt_oss", 7.0)).endswith("gpt_oss_l1")
