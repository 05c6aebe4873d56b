"""bench/hf_ep_bench.py on CPU: transformers' Qwen3-MoE, tiny dims, its experts sharded over 2 gloo
ranks by transformers' own DistributedConfig (all-reduce EP), every mode (inductor, tbo, tbo-split)
on two batch shapes; and bench/multi_gpu.sh, the per-machine script that runs it on the GPUs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))  # spawned ranks inherit it
import hf_ep_bench  # noqa: E402

SHAPES = ("2x8", "4x1")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("hf_ep_bench")
    argv = ["--device", "cpu", "--tiny", "--world", "2", "--layers", "1", "--shapes", ",".join(SHAPES),
            "--iters", "1", "--out", str(out), "--ckpt-dir", str(out / "ckpt")]
    assert hf_ep_bench.main(argv) == 0
    return json.loads((out / "hf_ep_gloo_ep2.json").read_text()), (out / "hf_ep_gloo_ep2.md").read_text()


def test_every_mode_and_shape_has_a_timed_row(bench):
    data, md = bench
    rows = {(r["mode"], r["shape"]): r for r in data["rows"]}
    assert set(rows) == {(m, s) for m in hf_ep_bench.MODES for s in SHAPES}, sorted(rows)
    for r in rows.values():
        assert "error" not in r, r.get("traceback", r["error"])
        assert r["ms"] > 0 and len(r["ms_per_rank"]) == 2 and r["first_call_s"] > 0, r
        assert r["ep"] == 2 and r["style"] == "ep" and r["tokens_per_rank"] == eval(r["shape"].replace("x", "*"))
    assert data["meta"]["model"]["num_experts"] == 8 and "tbo vs inductor" in md
    assert md.count("| gloo |") == len(SHAPES)


def test_tbo_equals_eager_in_fp32_and_reports_its_split(bench):
    """fp32 on CPU: both tbo modes equal the sharded model's eager logits within 1e-5 on every rank,
    and each compiled graph's split decision is recorded: the all-reduce EP graph splits by request."""
    data, _ = bench
    for r in data["rows"]:
        if r["mode"] == "inductor":
            assert r["rel_diff"] < 1e-4, r
            assert "graphs" not in r
            continue
        assert r["rel_diff"] <= 1e-5 and r["max_abs_diff"] <= 1e-5, r
        (g,) = r["graphs"]
        assert set(g) == {"T", "cut", "did_split", "comm", "fallback"}, g
        B = int(r["shape"].split("x")[0])
        assert g["did_split"] and r["split"] and g["comm"] == 1 and g["fallback"] is None, g
        assert (g["T"], g["cut"]) == (B, B // 2), g


#: stage -> what its dry run must print (NGPU=8, so ep8 runs too)
STAGES = {
    "tbo_bench_p2p_off": ["bench/tbo_bench.py", "--links p2p_off", "--slice deepseek_v3", "--slice gpt_oss", "--world 8"],
    "tbo_bench_nvlink": ["bench/tbo_bench.py", "--links nvlink", "--slice gpt_oss"],
    "hf_ep": ["env NCCL_P2P_DISABLE=1 torchrun --standalone --nproc-per-node 8 bench/hf_ep_bench.py",
              "--link p2p_off", "--link nvlink", "--shapes 8x512,256x1"],
    "serve": ["torchrun --standalone --nproc-per-node 8 bench/serve_bench.py", "--modes serial,auto",
              "--concurrency 32,64,128,256", "--overlap"],
    "ep8": ["--links p2p_off", "--links nvlink", "--prefill 1024,2048,4096,8192", "--decode 64,128,256,512"],
}


def _dry(stage, ngpu="8"):
    return subprocess.run(["bash", str(ROOT / "bench" / "multi_gpu.sh"), stage], capture_output=True, text=True,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "MULTI_GPU_DRY": "1", "NGPU": ngpu,
                                         "OUT": "/tmp/multi_gpu_dry"})


def test_multi_gpu_script_parses_and_each_stage_runs_the_bench_it_names():
    """bash -n, the multicast switches, and a dry run of each of issue 23's stages (commands printed,
    nothing run); an unknown stage and ep8 on fewer than 8 GPUs are refused."""
    script = ROOT / "bench" / "multi_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in script.read_text()
    for stage, wanted in STAGES.items():
        r = _dry(stage)
        assert r.returncode == 0, (stage, r.stdout, r.stderr)
        for w in wanted:
            assert w in r.stdout, (stage, w, r.stdout)
    assert "NCCL_P2P_DISABLE=1" not in _dry("hf_ep_nvlink").stdout
    bad = _dry("no_such_stage")
    assert bad.returncode == 2 and "unknown stage" in bad.stdout
    few = _dry("ep8", ngpu="4")
    assert few.returncode == 3 and "needs 8 GPUs" in few.stdout
