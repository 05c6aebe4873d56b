"""The plan file and the CLI: safe loading, determinism, refusals, atomic writes, one-line errors."""
from __future__ import annotations

import json
import pickletools

import pytest
import torch

from tbo_compiler import TboError, load_plan
from tbo_compiler.cli import main as cli_main
from tbo_compiler.compile import compile_model_dir
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.plan import PlanError, read_plan, save_plan

KW = dict(dtype=torch.float32, block_size=4, max_blocks=8, profile="cpu")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_tiny("qwen3_moe", tmp_path_factory.mktemp("plan") / "q", seed=2, num_hidden_layers=2)


def test_same_input_same_bytes_and_no_code(qwen, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    compile_model_dir(qwen, a, token_counts=(6, 10), **KW)
    compile_model_dir(qwen, b, token_counts=(6, 10), **KW)
    assert a.read_bytes() == b.read_bytes()
    # only plain containers: torch.load(weights_only=True) and no class references in the pickle
    payload = torch.load(a, weights_only=True)
    assert set(payload) == {"json", "sha256"} and isinstance(payload["json"], str)
    import zipfile
    with zipfile.ZipFile(a) as z:
        names = z.namelist()
        pkl = z.read(next(n for n in names if n.endswith("data.pkl")))
    assert not [op for op, arg, _ in pickletools.genops(pkl) if op.name in ("GLOBAL", "STACK_GLOBAL")]
    assert not [n for n in names if "/data/" in n]  # no tensor storage at all: no weights
    plan = read_plan(a)
    assert [bk["tokens"] for bk in plan["buckets"]] == [6, 10]
    for bk in plan["buckets"]:  # both programs per bucket; parameters are placeholders named by FQN
        assert set(bk["programs"]) == {"tbo", "serial"}
        tbo = bk["programs"]["tbo"]
        assert tbo["cut"] == bk["tokens"] // 2 and bk["programs"]["serial"]["cut"] == 0
        params = [i for i in tbo["inputs"] if i["kind"] == "param"]
        assert params and all(i["target"].endswith(("weight", "bias", "w13", "w2")) for i in params)
    assert len(a.read_bytes()) < 2_000_000


def test_plan_for_another_model_or_torch_is_refused(qwen, tmp_path):
    p = tmp_path / "p.pt"
    compile_model_dir(qwen, p, token_counts=(6,), **KW)
    assert load_plan(p, qwen, dtype=torch.float32) is not None
    other = make_tiny("qwen3_moe", tmp_path / "other", seed=2, num_hidden_layers=2, rms_norm_eps=1e-5)
    with pytest.raises(PlanError, match="another model"):
        load_plan(p, other)
    plan = read_plan(p)
    plan["versions"]["torch"] = "1.0.0"
    old = tmp_path / "old.pt"
    save_plan(plan, old)
    with pytest.raises(PlanError, match="torch 1.0.0"):
        load_plan(old, qwen)
    (tmp_path / "junk.pt").write_bytes(b"not a plan")
    with pytest.raises(PlanError, match="not a tbo plan"):
        load_plan(tmp_path / "junk.pt", qwen)


def test_bucket_too_small_is_a_clear_error(qwen, tmp_path):
    p = tmp_path / "p.pt"
    compile_model_dir(qwen, p, token_counts=(4,), **KW)
    run = load_plan(p, qwen, dtype=torch.float32)
    kv = run.new_kv_cache(16)
    b = kv.make_batch([("r", list(range(1, 7)))], max_blocks=8)
    with pytest.raises(TboError, match="exceeds the plan's largest bucket"):
        run(*b.args(), kv.caches)


def test_cli_writes_plan_and_dumps(qwen, tmp_path, capsys):
    out, dumps = tmp_path / "plan.pt", tmp_path / "dumps"
    rc = cli_main([str(qwen), "-o", str(out), "--tokens", "8", "--dtype", "float32", "--profile", "cpu",
                   "--dump-dir", str(dumps), "--block-size", "4", "--max-blocks", "8"])
    assert rc == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "T=8: TBO cut 4/4" in printed and "wrote" in printed
    for f in ("graph_before.svg", "graph_after.svg", "schedule.json", "summary.txt"):
        assert (dumps / "T8" / f).stat().st_size > 100


def test_cli_check_validates_a_plan(qwen, tmp_path, capsys):
    """Validate-only mode: a good plan verifies; one whose schedule was edited is refused in one line."""
    p = tmp_path / "p.pt"
    compile_model_dir(qwen, p, token_counts=(6,), **KW)
    assert cli_main([str(qwen), "--check", str(p)]) == 0
    assert "2 programs in 1 buckets verified" in capsys.readouterr().out
    plan = read_plan(p)
    instrs = plan["buckets"][0]["programs"]["tbo"]["instrs"]
    last_run = next(x for x in reversed(instrs) if x[0] == "run")
    instrs.insert(0, last_run)  # the output's producer first: it runs before its inputs
    bad = tmp_path / "bad.pt"
    save_plan(plan, bad)
    assert cli_main([str(qwen), "--check", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tbo-compile: instruction") and "\n" not in err


def test_cli_failure_is_one_line_and_leaves_no_plan(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "plan.pt"
    rc = cli_main([str(bad), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and not out.exists()
    assert err.count("\n") == 0 and "unknown model_type 'llama'" in err
    # an existing plan is not clobbered by a failed compile
    out.write_bytes(b"old plan")
    assert cli_main([str(bad), "-o", str(out)]) == 1 and out.read_bytes() == b"old plan"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".plan.pt")]
    assert cli_main([str(tmp_path / "missing"), "-o", str(out)]) == 1
    assert "config.json" in capsys.readouterr().err


def test_export_capture_gives_the_same_program_results(qwen, tmp_path):
    """`--capture export` (torch.export + decompositions) and the default make_fx capture compile
    to plans that both equal the eager model."""
    from tbo_compiler.models import load_model

    model = load_model(qwen, dtype=torch.float32, block_size=4)
    outs = {}
    for cap in ("make_fx", "export"):
        p = tmp_path / f"{cap}.pt"
        compile_model_dir(qwen, p, token_counts=(9,), capture=cap, **KW)
        run = load_plan(p, qwen, dtype=torch.float32, policy="tbo")
        kv = run.new_kv_cache(16)
        b = kv.make_batch([("a", [5, 6, 7, 8]), ("b", [9, 10, 11, 12, 13])], max_blocks=8)
        outs[cap] = run(*b.args(), kv.caches)
    kv = model.new_kv_cache(16)
    b = kv.make_batch([("a", [5, 6, 7, 8]), ("b", [9, 10, 11, 12, 13])], max_blocks=8)
    with torch.no_grad():
        ref = model(*b.args(), kv.caches)
    assert (outs["make_fx"] - ref).abs().max() <= 2e-5 and (outs["export"] - ref).abs().max() <= 2e-5


@pytest.mark.parametrize("failure, says", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                  "data/0: file write failed"), "file write failed"),
])
def test_a_failed_plan_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failure, says):
    """A full disk while writing: one PlanError line naming the path and the cause, no temp file, and
    an existing plan untouched."""
    import tbo_compiler.plan as plan_mod

    target = tmp_path / "plan.pt"
    target.write_bytes(b"old plan")

    def failing_save(obj, f):
        f.write(b"partial")
        raise failure
    monkeypatch.setattr(plan_mod.torch, "save", failing_save)
    with pytest.raises(PlanError) as ei:
        save_plan({"a": 1}, target)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"cannot write plan {target}: ") and says in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.pt"] and target.read_bytes() == b"old plan"
