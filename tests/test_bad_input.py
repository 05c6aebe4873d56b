"""Bad input: one TboError line naming the cause (field, file, tensor), a non-zero exit from the
CLI with exactly one line on stderr, and nothing written.

Tested elsewhere, not repeated here:
  tests/test_loader.py      unknown model_type, unreadable or missing config.json, a missing config
                            field, a bad value (topk_method), a missing tensor (single file and index),
                            a misshaped tensor (plain and int4 weight_shape), a missing shard file
  tests/test_new_archs.py   misshaped MXFP4 scales, bad layer_types, experts that do not divide over ranks
  tests/test_plan.py        a plan for another model or torch, a junk file, an edited schedule (--check),
                            a failed compile leaves no plan, a batch larger than every bucket
                            (test_bucket_too_small_is_a_clear_error)
  tests/test_passes.py      a graph that cannot be split names the user's source line
                            (test_token_mixing_is_reported_with_source_line)
  tests/test_cli_input.py   bad CLI numbers (--ep 0, --mtp -1, ...)
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tbo_compiler import TboError, load_plan
from tbo_compiler.cli import main as cli_main
from tbo_compiler.compile import compile_model_dir
from tbo_compiler.models import build_model, load_model
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.plan import read_plan, save_plan

KW = dict(block_size=4, max_blocks=8, profile="cpu", token_counts=(4,))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_tiny("qwen3_moe", tmp_path_factory.mktemp("bad") / "q", seed=3, num_hidden_layers=2)


@pytest.fixture(scope="module")
def plan_bf16_ep2(qwen, tmp_path_factory):
    """The one plan these tests compile: bf16, two expert-parallel ranks."""
    p = tmp_path_factory.mktemp("plan") / "plan.pt"
    compile_model_dir(qwen, p, ep=2, dtype=torch.bfloat16, **KW)
    return p


def _tree(root) -> dict:
    """{path: sha256} of every file under root: to show that nothing was written or changed."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in Path(root).rglob("*") if f.is_file()}


def _one_line(fn, *needles, root) -> str:
    """fn() raises one TboError line holding every needle, and writes nothing under root."""
    before = _tree(root)
    with pytest.raises(TboError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert _tree(root) == before
    return msg


def _cli(capsys, argv, *needles, root) -> str:
    before = _tree(root)
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and err.startswith("tbo-compile: "), err
    for n in needles:
        assert n in err, (n, err)
    assert _tree(root) == before
    return err


def _copy(src, tmp_path, name="m"):
    return shutil.copytree(src, tmp_path / name)


def _edit_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **fields}))
    return d


# 1. config.json -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, says", [
    ("hidden_size", "x", "field 'hidden_size' must be a positive integer, got 'x'"),
    ("num_hidden_layers", -2, "field 'num_hidden_layers' must be a positive integer, got -2"),
    ("num_experts", True, "field 'num_experts' must be a positive integer, got True"),
    ("head_dim", 0, "field 'head_dim' must be a positive integer or null, got 0"),
    ("rms_norm_eps", "1e-6", "field 'rms_norm_eps' must be a number, got '1e-6'"),
    ("norm_topk_prob", "yes", "field 'norm_topk_prob' must be true or false, got 'yes'"),
    ("mlp_only_layers", 0, "field 'mlp_only_layers' must be a list, got 0"),
    ("rope_scaling", "yarn", "field 'rope_scaling' must be a JSON object or null, got 'yarn'"),
])
def test_config_field_of_the_wrong_kind(qwen, tmp_path, field, value, says):
    d = _edit_config(_copy(qwen, tmp_path), **{field: value})
    _one_line(lambda: load_model(d), "config.json: " + says, root=tmp_path)


def test_config_field_of_a_wrapped_or_deepseek_config(tmp_path):
    """The same table serves every architecture, and kimi_k25's text_config."""
    k = make_tiny("kimi_k25", tmp_path / "k", num_hidden_layers=2)
    cfg = json.loads((k / "config.json").read_text())
    cfg["text_config"]["kv_lora_rank"] = 32.0
    (k / "config.json").write_text(json.dumps(cfg))
    _one_line(lambda: load_model(k), "field 'kv_lora_rank' must be a positive integer, got 32.0",
              root=tmp_path)
    d = _edit_config(make_tiny("deepseek_v3", tmp_path / "d", num_hidden_layers=2), first_k_dense_replace=0)
    assert build_model(d).config.first_k_dense_replace == 0  # 0 means "no dense prefix": allowed
    _edit_config(d, topk_method=None)
    _one_line(lambda: load_model(d), "field 'topk_method' must be a string, got None", root=tmp_path)


def test_config_empty_not_an_object_or_model_type_not_a_string(qwen, tmp_path):
    d = _copy(qwen, tmp_path)
    (d / "config.json").write_text("")
    _one_line(lambda: load_model(d), "config.json: unreadable JSON", root=tmp_path)
    (d / "config.json").write_text("[1, 2]")
    _one_line(lambda: load_model(d), "config.json: expected a JSON object, got list", root=tmp_path)
    _edit_config(_copy(qwen, tmp_path, "t"), model_type=["qwen3_moe"])
    _one_line(lambda: load_model(tmp_path / "t"), "unknown model_type ['qwen3_moe']", root=tmp_path)


def test_model_dir_missing(tmp_path):
    _one_line(lambda: load_model(tmp_path / "nope"), "nope: no such model directory", root=tmp_path)


def test_cli_bad_config_field(qwen, tmp_path, capsys):
    d = _edit_config(_copy(qwen, tmp_path), hidden_size="x")
    out = tmp_path / "plan.pt"
    _cli(capsys, [d, "-o", out, "--tokens", "4", "--profile", "cpu"],
         "config.json: field 'hidden_size' must be a positive integer, got 'x'", root=tmp_path)
    out.write_bytes(b"an older plan")  # a failed compile leaves the old plan as it was
    _cli(capsys, [d, "-o", out], "field 'hidden_size'", root=tmp_path)


# 2. safetensors --------------------------------------------------------------------------------------

def _rewrite(path, **tensors):
    with safe_open(str(path), "pt") as h:
        old = {n: h.get_tensor(n) for n in h.keys()}
    save_file({**old, **tensors}, str(path))


def test_int_tensor_where_a_float_weight_is_expected(qwen, tmp_path):
    d = _copy(qwen, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    w = load_file(str(d / "model.safetensors"))[name]
    _rewrite(d / "model.safetensors", **{name: w.to(torch.int32)})
    _one_line(lambda: load_model(d), "model.safetensors: tensor " + name,
              "is int32, expected a floating-point weight", root=tmp_path)


def test_float_tensor_where_mxfp4_is_expected(tmp_path):
    d = make_tiny("gpt_oss", tmp_path / "g", num_hidden_layers=1)
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    file = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(d / file), "pt") as h:
        blocks = h.get_tensor(name)
    _rewrite(d / file, **{name: blocks.to(torch.bfloat16)})
    _one_line(lambda: load_model(d), f"{file}: tensor {name} is bfloat16, expected uint8 (MXFP4)",
              root=tmp_path)


def test_fp8_weight_without_its_scales(tmp_path):
    d = make_tiny("deepseek_v3", tmp_path / "d", num_hidden_layers=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = next(n for n in index["weight_map"] if n.endswith("experts.0.up_proj.weight_scale_inv"))
    del index["weight_map"][name]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line(lambda: load_model(d), "is float8_e4m3fn but", name + " is missing", root=tmp_path)


def test_truncated_safetensors(qwen, tmp_path):
    d = _copy(qwen, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    _one_line(lambda: load_model(d), "model.safetensors: unreadable safetensors", root=tmp_path)
    s = make_tiny("deepseek_v3", tmp_path / "s", num_hidden_layers=2)  # a shard cut in half
    shard = s / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    _one_line(lambda: load_model(s), "model-00002-of-00002.safetensors: unreadable safetensors",
              root=tmp_path)


# 3. compile arguments (the API; the CLI refuses them in argparse) ------------------------------------

@pytest.mark.parametrize("kw, says", [
    (dict(block_size=0), "block_size must be a positive integer, got 0"),
    (dict(ep=0), "ep must be a positive integer, got 0"),
    (dict(max_blocks=-1), "max_blocks must be a positive integer, got -1"),
    (dict(tokens_per_request=0), "tokens_per_request must be a positive integer, got 0"),
    (dict(tokens_per_request=-1), "tokens_per_request must be a positive integer, got -1"),
    (dict(token_counts=()), "token_counts must be a non-empty list of positive integers, got ()"),
    (dict(token_counts=[8, 0]), "token_counts must be a non-empty list of positive integers, got [8, 0]"),
    (dict(num_layers=0), "num_layers must be 1..2 (the model's num_hidden_layers), got 0"),
    (dict(num_layers=-1), "num_layers must be 1..2 (the model's num_hidden_layers), got -1"),
    (dict(num_layers=3), "num_layers must be 1..2 (the model's num_hidden_layers), got 3"),
    (dict(mode="serve"), "mode must be one of prefill, decode, got 'serve'"),
    (dict(moe_comm="nccl"), "moe_comm must be one of a2a, allgather, allreduce, got 'nccl'"),
    (dict(profile="tpu"), "profile must be one of cpu,"),
    (dict(capture="jit"), "capture must be one of make_fx, export, got 'jit'"),
])
def test_compile_arguments(qwen, tmp_path, kw, says):
    out = tmp_path / "plan.pt"
    _one_line(lambda: compile_model_dir(qwen, out, **{**KW, **kw}), says, root=tmp_path)
    assert not out.exists()


# 4. plan files ---------------------------------------------------------------------------------------

class _Sentinel:
    """Unpickling this would create the file `path` (i.e. run code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (shutil.copyfile, (os.devnull, self.path))


def _bad_plans(plan, d) -> dict:
    """{name: (path, what its message must say)} for every kind of bad plan file."""
    data = plan.read_bytes()
    (d / "truncated.pt").write_bytes(data[:len(data) // 2])
    at = data.index(b'"tokens":4')  # one digit of the JSON payload: still a valid zip, pickle and JSON
    (d / "tampered.pt").write_bytes(data[:at + 9] + b"5" + data[at + 10:])
    (d / "broken.pt").write_bytes(data[:at + 9] + b"x" + data[at + 10:])  # no longer JSON
    torch.save({"json": _Sentinel(d / "ran")}, d / "code.pt")
    with open(d / "code.pkl", "wb") as f:
        pickle.dump({"json": _Sentinel(d / "ran")}, f)
    torch.save(torch.zeros(3), d / "tensor.pt")
    old = read_plan(plan)
    old["versions"]["format"] = 2
    text = json.dumps(old, sort_keys=True, separators=(",", ":"))
    torch.save({"json": text}, d / "format2.pt")  # what FORMAT_VERSION 2 wrote: no checksum
    return {"truncated": (d / "truncated.pt", "not a tbo plan, or truncated"),
            "tampered": (d / "tampered.pt", "plan is corrupted (checksum mismatch)"),
            "tampered, JSON broken": (d / "broken.pt", "plan is corrupted (checksum mismatch)"),
            "pickled code": (d / "code.pt", "holds pickled objects, not plain data; refused without running"),
            "pickled code, no zip": (d / "code.pkl", "holds pickled objects"),
            "a tensor": (d / "tensor.pt", "tensor.pt: not a tbo plan"),
            "a directory": (d, "is a directory, not a plan file"),
            "format 2": (d / "format2.pt", "plan format 2 is not 3; recompile it")}


def test_bad_plan_files(qwen, plan_bf16_ep2, tmp_path, capsys):
    """Via the API (read_plan, load_plan) and `tbo-compile MODEL --check`: one line each, never
    torch's advice to load with weights_only=False, and the pickled code never runs."""
    for name, (path, says) in _bad_plans(plan_bf16_ep2, tmp_path).items():
        msg = _one_line(lambda: read_plan(path), str(path), says, root=tmp_path)
        assert "weights_only" not in msg, (name, msg)
        _one_line(lambda: load_plan(path, qwen), says, root=tmp_path)
        err = _cli(capsys, [qwen, "--check", path], says, root=tmp_path)
        assert "weights_only" not in err
    assert not (tmp_path / "ran").exists()


def test_check_a_plan_for_another_torch_or_model(qwen, plan_bf16_ep2, tmp_path, capsys):
    """The API refusals are in tests/test_plan.py; here `tbo-compile --check` says the same in one line."""
    plan = read_plan(plan_bf16_ep2)
    plan["versions"]["torch"] = "1.0.0"
    save_plan(plan, tmp_path / "old.pt")
    _cli(capsys, [qwen, "--check", tmp_path / "old.pt"], "plan was compiled with torch 1.0.0", root=tmp_path)
    other = _edit_config(_copy(qwen, tmp_path), rms_norm_eps=1e-5)
    _cli(capsys, [other, "--check", plan_bf16_ep2], "plan was compiled for another model", root=tmp_path)


def test_plan_checksum_is_deterministic_and_checked(plan_bf16_ep2, tmp_path):
    payload = torch.load(plan_bf16_ep2, weights_only=True)
    assert payload["sha256"] == hashlib.sha256(payload["json"].encode()).hexdigest()
    save_plan(read_plan(plan_bf16_ep2), tmp_path / "again.pt")  # same plan, same bytes
    assert (tmp_path / "again.pt").read_bytes() == plan_bf16_ep2.read_bytes()
    torch.save({"json": payload["json"]}, tmp_path / "unsigned.pt")  # this format without its checksum
    payload["json"] = payload["json"].replace('"tokens":4', '"tokens":5')
    torch.save(payload, tmp_path / "edited.pt")
    for name in ("unsigned.pt", "edited.pt"):
        _one_line(lambda: read_plan(tmp_path / name), "plan is corrupted (checksum mismatch)",
                  root=tmp_path)


def test_plan_for_another_dtype(qwen, plan_bf16_ep2):
    _one_line(lambda: load_plan(plan_bf16_ep2, qwen, dtype=torch.float32),
              "plan was compiled for bfloat16, not float32: load it with dtype=torch.bfloat16 (or no dtype), "
              "or recompile with --dtype float32", root=qwen)


def test_plan_for_another_parallel_config(qwen, plan_bf16_ep2, monkeypatch):
    from tbo_compiler.runtime import comm

    monkeypatch.setattr(comm, "_GROUPS", {})  # no "ep" group left registered by another test
    _one_line(lambda: load_plan(plan_bf16_ep2, qwen), "tbo comm group 'ep' (world 2) is not registered", root=qwen)
    _one_line(lambda: load_plan(plan_bf16_ep2, qwen, rank=2),
              "rank 2 is outside the plan's 2 expert-parallel ranks (0..1)", root=qwen)
    _one_line(lambda: load_plan(plan_bf16_ep2, qwen, group="tp"),
              "plan was compiled for comm group 'ep', not 'tp'", root=qwen)


def test_ep2_plan_in_a_one_rank_process_group(qwen, plan_bf16_ep2, tmp_path, monkeypatch):
    import torch.distributed as dist

    from tbo_compiler.runtime import comm

    monkeypatch.setattr(comm, "_GROUPS", {})  # no "ep" group left registered by another test
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        _one_line(lambda: load_plan(plan_bf16_ep2, qwen),
                  "plan was compiled for 2 expert-parallel ranks, torch.distributed has 1: launch 2 ranks or "
                  "recompile with --ep 1", root=qwen)
    finally:
        dist.destroy_process_group()
