"""examples/serve_ep.py on bad input: one line per rank naming the rank and the cause, no traceback
from the ranks (torchrun's own summary of a failed child stays)."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_plan_for_another_model_is_one_line_per_rank(tiny_dirs, tmp_path):
    from tbo_scenarios import compile_plans

    plan = compile_plans(tiny_dirs["mixtral"], tmp_path, names=("prefill",))["prefill"]   # not qwen3's
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(ROOT / "examples" / "serve_ep.py"), str(tiny_dirs["qwen3_moe"]), "--plan", str(plan)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("serve_ep.py: rank ")]
    assert sorted(line[:20] for line in ours) == ["serve_ep.py: rank 0:", "serve_ep.py: rank 1:"], r.stderr[-3000:]
    assert all("plan" in line for line in ours)
    # no rank printed a Python traceback of its own: the only one left is torchrun's ChildFailedError
    assert r.stderr.count("Traceback (most recent call last)") <= 1, r.stderr[-3000:]
