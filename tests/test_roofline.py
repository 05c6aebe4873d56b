"""bench/roofline.py: the floors reproduce the issue's reference numbers, the op-family classifier
puts attention, experts, router and lm_head where they belong, and the CPU smoke run writes rows
whose serial and TBO programs equal eager."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import roofline as rl  # noqa: E402

# issue 24's table: prefill 4096 TFLOP; decode 256 weight GB and KV GB (read)
ISSUE = {"gpt_oss_20b": (29.5, 40.7, 4.0), "qwen3_30b_a3b": (24.9, 60.4, 13.0), "mixtral_8x7b": (104.0, 94.0, 17.0)}
ISSUE_FLOOR_MS = {"gpt_oss_20b": (37.4, 9.3), "qwen3_30b_a3b": (31.5, 15.3), "mixtral_8x7b": (132.0, 23.2)}


@pytest.mark.parametrize("name", sorted(ISSUE))
def test_floors_reproduce_the_issue(name):
    tflop, w_gb, kv_gb = ISSUE[name]
    pre = rl.floors(rl.MODELS[name], "prefill", 4096)
    dec = rl.floors(rl.MODELS[name], "decode", 256)
    ft, bt = pre["flops_terms"], dec["bytes_terms"]
    # the issue counted GEMMs only (projections, router, experts, lm_head): scores are our addition
    assert (pre["flops"] - ft["attn_scores"]) / 1e12 == pytest.approx(tflop, rel=0.03)
    assert 0 < ft["attn_scores"] < 0.04 * pre["flops"]
    weights = dec["bytes"] - bt["kv_read"] - bt["kv_write"]
    assert weights / 1e9 == pytest.approx(w_gb, rel=0.03)
    assert bt["kv_read"] / 1e9 == pytest.approx(kv_gb, rel=0.05)  # the issue's "~" numbers
    assert pre["bound"] == "compute" and dec["bound"] == "memory"
    pre_ms, dec_ms = ISSUE_FLOOR_MS[name]
    assert pre["floor_ms"] == pytest.approx(pre_ms, rel=0.04)   # ours includes the score FLOPs
    assert dec["floor_ms"] == pytest.approx(dec_ms, rel=0.03)


def test_floor_terms():
    c = rl.MODELS["mixtral_8x7b"]
    # decode 1 token: 2 of 8 experts per layer; prefill: every expert
    assert rl.expected_experts_touched(8, 2, 1) == pytest.approx(2.0)
    assert rl.expected_experts_touched(128, 8, 4096) == pytest.approx(128.0)
    one = rl.floors(c, "decode", 1)
    assert one["bytes_terms"]["experts"] == pytest.approx(32 * 2 * 3 * 4096 * 14336 * 2)
    # GPT-OSS: the 12 sliding layers read 128 keys per request, the 12 full ones 513
    g = rl.floors(rl.MODELS["gpt_oss_20b"], "decode", 1)
    assert g["bytes_terms"]["kv_read"] == (12 * 128 + 12 * 513) * 2 * 8 * 64 * 2
    # lm_head over every token (the model computes all logits)
    assert rl.floors(c, "prefill", 1024)["flops_terms"]["lm_head"] == 2 * 4096 * 32000 * 1024


def _tiny_serial_program(tmp_path, name="gpt_oss_20b"):
    from tbo_compiler.load import programs_of
    from tbo_compiler.plan import read_plan

    p = rl.ensure_plan(tmp_path, name, rl.TINY[name], "prefill", 32, torch.float32, rl.TINY_SHAPE, "cpu")
    return programs_of(read_plan(p), "cpu")[32]["serial"]


@pytest.mark.parametrize("name,attn,route", [("gpt_oss_20b", "paged_attention", "route_topk"),
                                             ("deepseek_v3_slice", "latent_attention", "topk")])
def test_classifier(tmp_path, name, attn, route):
    bp = _tiny_serial_program(tmp_path, name)
    fam = rl.classify(bp.gm, bp.inputs)
    nodes = {n.name: n for n in bp.gm.graph.nodes}
    by_op = {}
    for n, f in fam.items():
        by_op.setdefault(rl.op_name(nodes[n]), set()).add(f)
    assert by_op[attn] == {"attention"}
    assert by_op["moe_experts"] == {"moe_experts"}
    assert by_op[route] == {"routing"}
    assert by_op["rms_norm"] == {"norms_rope_act"}
    assert by_op["index_put"] == {"kv_write"}
    # the 16-bit GEMMs are dense; tbo.linear_f32 (fp32 out) makes the routers' logits (routing) and,
    # last, the lm_head's (one)
    gemms = [n for n in bp.gm.graph.nodes if n.name in fam and rl.op_name(n) in ("mm", "addmm")]
    assert gemms and {fam[n.name] for n in gemms} == {"dense_gemm"}
    f32 = [fam[n.name] for n in bp.gm.graph.nodes if n.name in fam and rl.op_name(n) == "linear_f32"]
    assert f32[-1] == "lm_head" and f32.count("lm_head") == 1 and set(f32[:-1]) == {"routing"}


def test_smoke_run_cpu(tmp_path):
    out = tmp_path / "out"
    rl.main(["--device", "cpu", "--tiny", "--models", "qwen3_30b_a3b", "--buckets", "prefill:32", "decode:8",
             "--out", str(out), "--plans", str(tmp_path / "plans"), "--iters", "2", "--warmup", "1"])
    res = json.loads((out / "roofline.json").read_text())
    assert res["meta"]["tiny"] and res["meta"]["torch"] == torch.__version__
    rows = res["rows"]
    assert [(r["phase"], r["tokens"]) for r in rows] == [("prefill", 32), ("decode", 8)]
    for r in rows:
        for k in ("model", "serial_ms", "tbo_ms", "floor_ms", "flops", "bytes", "pct_of_roofline"):
            assert r[k] is not None, k
        assert r["serial_ms"] > 0 and r["tbo_ms"] > 0 and r["floor_ms"] > 0
        assert r["serial_rel_diff"] <= 1e-4 and r["tbo_rel_diff_vs_eager_halves"] <= 1e-4
        assert 0 < r["tbo_cut"] < r["tokens"]
        p = r["profile"]
        assert set(p["families_ms"]) == set(rl.FAMILIES)
        assert p["families_ms"]["moe_experts"] > 0 and p["families_ms"]["attention"] > 0
        assert sum(p["families_share"].values()) == pytest.approx(1.0, abs=1e-2)
        assert len(p["top_nodes"]) == 10
    md = (out / "roofline.md").read_text()
    assert "| qwen3_30b_a3b (L2) | prefill 32 |" in md and "moe_experts" in md
    # a second run reuses the plans on disk
    before = sorted(p.name for p in (tmp_path / "plans").glob("*.pt"))
    assert len(before) == 2
    rl.main(["--device", "cpu", "--tiny", "--models", "qwen3_30b_a3b", "--buckets", "decode:8", "--no-profile",
             "--out", str(out), "--plans", str(tmp_path / "plans"), "--iters", "1", "--warmup", "0"])
    assert sorted(p.name for p in (tmp_path / "plans").glob("*.pt")) == before
    assert "profile" not in json.loads((out / "roofline.json").read_text())["rows"][0]
