"""The README runs as written: every ```python and ```bash block is run by a test (or says why
not), from a fresh directory, with this checkout's tools on PATH."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- (snippet: \S+|not run here: [^>]*) -->\n)?```(python|bash)\n(.*?)```", re.S)


def blocks(test_id: str, lang: str) -> list[str]:
    return [code for mark, lg, code in BLOCK.findall(README) if lg == lang and mark == f"snippet: {test_id}"]


def test_every_block_is_run_or_says_why_not():
    for mark, lang, code in BLOCK.findall(README):
        assert mark, f"README {lang} block without a snippet/not-run marker:\n{code[:200]}"
        if mark.startswith("snippet: "):
            path, name = mark.removeprefix("snippet: ").split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), f"{mark}: no such test"


def test_python_snippets(tmp_path, monkeypatch):
    """The torch.compile snippet runs as written, and its logits are the model's without TBO."""
    (code,) = blocks("tests/test_readme.py::test_python_snippets", "python")
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    model = ns["model"]
    kv = model.new_kv_cache(num_blocks=64)
    with torch.no_grad():
        model(*kv.make_batch([("req0", [5, 6, 7, 8, 9]), ("req1", [10, 11, 12])]).args(), kv.caches)
        ref = model(*kv.make_batch([("req0", [13]), ("req1", [14])]).args(), kv.caches)
    assert ns["logits"].shape == ref.shape == (2, model.config.vocab_size)
    torch.testing.assert_close(ns["logits"], ref, atol=1e-5, rtol=1e-5)


def test_bash_snippets(tmp_path):
    """The plan commands and the torchrun recipe (2 gloo ranks, plan and torch.compile paths)."""
    script = "set -euo pipefail\n" + "".join(blocks("tests/test_readme.py::test_bash_snippets", "bash"))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TBO_DUMP_DIR", None)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    diffs = [float(x) for x in re.findall(r"max \|TBO - no TBO\| = (\S+)", r.stdout)]
    assert len(diffs) == 4 and max(diffs) <= 1e-4, r.stdout   # 2 ranks x (plan, torch.compile)
    assert "verified against their graphs" in r.stdout
    assert re.search(r"torch.compile graph of 16 tokens: TBO, split 8\+8, 4 comm ops", r.stdout), r.stdout
    assert re.search(r"prefill bucket 16: ran (tbo|serial)", r.stdout), r.stdout
    for plan in ("prefill", "decode", "mtp", "dp", "serial"):
        assert (tmp_path / f"{plan}.pt").is_file()
    assert (tmp_path / "dumps").is_dir()


def test_demo(tmp_path):
    """`make demo`'s command: the EP=2 demo passes its own TBO-vs-no-TBO check and prints the summary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TBO_DUMP_DIR", None)
    r = subprocess.run([sys.executable, "-m", "tbo_compiler.demo", "--out", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "-> OK" in r.stdout and "Verdict:" in r.stdout
    assert (tmp_path / "dumps" / "prefill" / "T16" / "summary.txt").is_file()
