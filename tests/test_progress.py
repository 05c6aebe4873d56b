"""tbo-compile's progress: plain lines per stage when stderr is a log, a live line on a terminal.

One tiny EP=2 DeepSeek-V3 is compiled through the CLI (stderr captured: not a terminal) and through
`compile_model_dir` into a forced-terminal rich Console; both must name every stage in order with
a clock that never goes back.
"""
import io
import re

import pytest
import torch
from rich.console import Console
from rich.progress import Progress

from tbo_compiler.cli import main as cli_main
from tbo_compiler.compile import compile_model_dir
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.passes.pipeline import PASSES
from tbo_compiler.progress import _Seconds, stage_progress

LAYERS = 3
PLAIN = re.compile(r"^tbo-compile: \[ *(\d+\.\d) s\] (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny("deepseek_v3", tmp_path_factory.mktemp("progress") / "ds", num_hidden_layers=LAYERS)


def _stages(T):
    """The stages a one-bucket compile reports, in order: capture, each pass per variant, plan."""
    return ([f"capture T={T}"] + [f"{p.name} T={T} (tbo)" for p in PASSES]
            + [f"{p.name} T={T} (serial)" for p in PASSES])


def _in_order(seen: list[str], want: list[str]) -> bool:
    it = iter(seen)
    return all(any(w == s for s in it) for w in want)


def test_plain_lines_per_stage_when_stderr_is_not_a_terminal(model_dir, tmp_path, capsys):
    plan = tmp_path / "plan.pt"
    assert cli_main([str(model_dir), "-o", str(plan), "--ep", "2", "--tokens", "8", "--dtype", "float32",
                     "--profile", "cpu", "--dump-dir", str(tmp_path / "dumps")]) == 0
    lines = capsys.readouterr().err.splitlines()
    parsed = [PLAIN.match(line) for line in lines]
    assert all(parsed), lines                 # nothing but stage lines: no spinner, no escape codes
    times = [float(m.group(1)) for m in parsed]
    stages = [m.group(2) for m in parsed]
    assert times == sorted(times)
    want = _stages(8) + ["dumps T=8", f"write {plan}"]
    assert _in_order(stages, want), stages
    assert sorted(s for s in stages if s in want) == sorted(want)   # each stage once


def test_terminal_live_line_names_each_stage_with_a_running_clock(model_dir, tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=150, color_system=None)
    assert console.is_terminal
    with stage_progress(console) as progress:
        compile_model_dir(model_dir, tmp_path / "plan.pt", ep=2, token_counts=(8,), dtype=torch.float32,
                          profile="cpu", progress=progress)
    text = ANSI.sub("", buf.getvalue()).replace("\r", "\n")
    shown = re.findall(r"tbo-compile (.*?) +(\d+\.\d) s", text)
    assert shown, text[:500]
    assert [float(t) for _, t in shown] == sorted(float(t) for _, t in shown)
    stages = [s.split(" layer ")[0].strip() for s, _ in shown]
    assert _in_order(stages, _stages(8)), stages
    # per layer while capturing: the detail names every layer of the model
    layers = {m for s, _ in shown for m in re.findall(r"capture T=8 layer (\d+)/" + str(LAYERS), s)}
    assert layers == {str(i + 1) for i in range(LAYERS)}


def test_clock_is_read_when_drawn_not_when_the_stage_changed():
    """The elapsed column asks the clock at render time: two renders with no update between them
    show different times (the old spinner froze at the value of its last update)."""
    now = [10.0]
    bar = Progress(_Seconds(), get_time=lambda: now[0], console=Console(file=io.StringIO()))
    task = bar.add_task("capture T=8")
    col = bar.columns[0]
    now[0] = 12.5
    first = col.render(bar.tasks[task]).plain
    now[0] = 14.0
    assert first == "  2.5 s" and col(bar.tasks[task]).plain == "  4.0 s"
