"""Loader: every architecture loads from its on-disk format; the weights are the dequantized
on-disk tensors; quant formats round-trip; every failure is one ModelLoadError line naming the
file and the tensor or field."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tbo_compiler.models import ModelLoadError, ParallelConfig, load_model, read_config
from tbo_compiler.models import quant
from tbo_compiler.models.deepseek_v3 import DeepseekV3Model
from tbo_compiler.models.qwen3_moe import Qwen3MoeModel
from tbo_compiler.models.tiny import ARCHS, make_tiny


def _disk(d, name):
    """An on-disk tensor, dequantized here (independently of the loader) to fp32."""
    index = d / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"] if index.exists() else None

    def get(n):
        with safe_open(str(d / (file[n] if file else "model.safetensors")), "pt") as f:
            return f.get_tensor(n)

    keys = file if file else safe_open(str(d / "model.safetensors"), "pt").keys()
    base = name.removesuffix(".weight")
    if name + "_scale_inv" in keys:
        return quant.dequantize_fp8_block(get(name), get(name + "_scale_inv"))
    if base + ".weight_packed" in keys:
        return quant.dequantize_int4_group(get(base + ".weight_packed"), get(base + ".weight_scale"),
                                           get(base + ".weight_shape"), 32)
    return get(name).float()


# Loading -------------------------------------------------------------------------------------

def test_each_arch_loads_with_its_on_disk_format(tiny_dirs, tiny_models):
    kinds = {"deepseek_v3": torch.float8_e4m3fn, "kimi_k25": torch.int32, "deepseek_v2": torch.bfloat16,
             "qwen3_moe": torch.bfloat16}
    for arch in kinds:  # GPT-OSS and Mixtral: tests/test_new_archs.py
        d, model = tiny_dirs[arch], tiny_models[arch]
        cls = Qwen3MoeModel if arch == "qwen3_moe" else DeepseekV3Model
        assert isinstance(model, cls) and model.block_size == 4
        prefix = "language_model." if arch == "kimi_k25" else ""
        expert = "weight_packed" if arch == "kimi_k25" else "weight"
        assert _dtype_on_disk(d, f"{prefix}model.layers.1.mlp.experts.3.up_proj.{expert}") == kinds[arch]
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters())
        assert not any(p.requires_grad for p in model.parameters())
    assert (tiny_dirs["deepseek_v3"] / "model.safetensors.index.json").exists()
    assert read_config(tiny_dirs["kimi_k25"]).n_group == 1  # from text_config
    assert read_config(tiny_dirs["deepseek_v2"]).q_lora_rank is None


def _dtype_on_disk(d, name):
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            if name in h.keys():
                return h.get_tensor(name).dtype
    raise KeyError(name)


CHECKED = {  # param accessor -> on-disk name (without the kimi prefix); layer 1 is an MoE layer
    "mla": [
        (lambda m: m.embed_tokens.weight, "model.embed_tokens.weight"),
        (lambda m: m.lm_head.weight, "lm_head.weight"),
        (lambda m: m.layers[0].self_attn.kv_b_proj.weight, "model.layers.0.self_attn.kv_b_proj.weight"),
        (lambda m: m.layers[0].self_attn.kv_a_proj_with_mqa.weight, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"),
        (lambda m: m.layers[0].mlp.gate_up_proj.weight[:192], "model.layers.0.mlp.gate_proj.weight"),
        (lambda m: m.layers[0].mlp.gate_up_proj.weight[192:], "model.layers.0.mlp.up_proj.weight"),
        (lambda m: m.layers[1].mlp.gate.weight, "model.layers.1.mlp.gate.weight"),
        (lambda m: m.layers[1].mlp.experts.w13[5, :32], "model.layers.1.mlp.experts.5.gate_proj.weight"),
        (lambda m: m.layers[1].mlp.experts.w13[5, 32:], "model.layers.1.mlp.experts.5.up_proj.weight"),
        (lambda m: m.layers[2].mlp.experts.w2[7], "model.layers.2.mlp.experts.7.down_proj.weight"),
        (lambda m: m.layers[1].mlp.shared_experts.down_proj.weight, "model.layers.1.mlp.shared_experts.down_proj.weight"),
        (lambda m: m.norm.weight, "model.norm.weight"),
    ],
    "qwen3_moe": [  # qkv_proj rows: q 0:128, k 128:192, v 192:256
        (lambda m: m.layers[1].self_attn.qkv_proj.weight[128:192], "model.layers.1.self_attn.k_proj.weight"),
        (lambda m: m.layers[1].self_attn.q_norm.weight, "model.layers.1.self_attn.q_norm.weight"),
        (lambda m: m.layers[0].mlp.down_proj.weight, "model.layers.0.mlp.down_proj.weight"),
        (lambda m: m.layers[2].mlp.experts.w13[6, 32:], "model.layers.2.mlp.experts.6.up_proj.weight"),
        (lambda m: m.layers[1].mlp.experts.w2[0], "model.layers.1.mlp.experts.0.down_proj.weight"),
    ],
    "mixtral": [  # qkv_proj rows: q 0:64, k 64:96, v 96:128
        (lambda m: m.layers[1].self_attn.qkv_proj.weight[64:96], "model.layers.1.self_attn.k_proj.weight"),
        (lambda m: m.layers[0].mlp.gate.weight, "model.layers.0.block_sparse_moe.gate.weight"),
        (lambda m: m.layers[1].mlp.experts.w13[5, :32], "model.layers.1.block_sparse_moe.experts.5.w1.weight"),
        (lambda m: m.layers[1].mlp.experts.w13[5, 32:], "model.layers.1.block_sparse_moe.experts.5.w3.weight"),
        (lambda m: m.layers[0].mlp.experts.w2[7], "model.layers.0.block_sparse_moe.experts.7.w2.weight"),
        (lambda m: m.norm.weight, "model.norm.weight"),
    ],
}


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt_oss"])  # GPT-OSS (MXFP4): test_new_archs.py
def test_loaded_weights_equal_dequantized_disk_tensors(tiny_dirs, tiny_models, arch):
    d, model = tiny_dirs[arch], tiny_models[arch]
    prefix = "language_model." if arch == "kimi_k25" else ""
    checks = CHECKED.get(arch, CHECKED["mla"])
    if arch in ("deepseek_v3", "kimi_k25"):
        checks = checks + [(lambda m: m.layers[1].self_attn.q_b_proj.weight, "model.layers.1.self_attn.q_b_proj.weight"),
                           (lambda m: m.layers[2].mlp.gate.e_score_correction_bias,
                            "model.layers.2.mlp.gate.e_score_correction_bias")]
    if arch == "deepseek_v2":
        checks = checks + [(lambda m: m.layers[1].self_attn.q_proj.weight, "model.layers.1.self_attn.q_proj.weight")]
    for get, name in checks:
        torch.testing.assert_close(get(model), _disk(d, prefix + name), atol=0, rtol=0, msg=name)


def test_mtp_layer_and_vision_tower_are_ignored(tiny_dirs, tiny_models):
    d = tiny_dirs["deepseek_v3"]
    L = read_config(d).num_hidden_layers
    names = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"model.layers.{L}.eh_proj.weight" in names and f"model.layers.{L}.mlp.experts.0.up_proj.weight" in names
    assert len(tiny_models["deepseek_v3"].layers) == L
    kimi = json.loads((tiny_dirs["kimi_k25"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert "vision_tower.patch_embed.proj.weight" in kimi


def test_expert_parallel_loads_only_this_ranks_experts(tiny_dirs, tiny_models):
    full = tiny_models["deepseek_v3"].layers[1].mlp.experts
    part = load_model(tiny_dirs["deepseek_v3"], parallel=ParallelConfig(ep_size=2, ep_rank=1), block_size=4)
    moe = part.layers[1].mlp
    assert moe.e_loc == 4 and moe.experts.w13.shape[0] == 4
    torch.testing.assert_close(moe.experts.w13, full.w13[4:], atol=0, rtol=0)
    torch.testing.assert_close(moe.experts.w2, full.w2[4:], atol=0, rtol=0)


def test_config_driven_options(tmp_path, tiny_dirs):
    d = make_tiny("qwen3_moe", tmp_path / "q", rms_norm_eps=1e-3)
    m = load_model(d, num_layers=2, dtype=torch.bfloat16)
    assert len(m.layers) == 2 and m.config.num_hidden_layers == 2
    assert m.norm.eps == 1e-3 and m.layers[1].self_attn.k_norm.eps == 1e-3  # rms_norm_eps not hard-coded
    assert m.layers[1].mlp.experts.w13.dtype == torch.bfloat16
    assert load_model(tiny_dirs["deepseek_v3"], num_layers=1).layers[0].self_attn.kv_a_layernorm.eps == 1e-6


# Quant formats ---------------------------------------------------------------------------------

def test_fp8_block_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-3, 1, 200)  # varied block ranges
    q, s = quant.quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 2)  # edge blocks
    dq = quant.dequantize_fp8_block(q, s)
    s_elem = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    # e4m3: 3 mantissa bits -> relative error <= 2^-4; near zero the subnormal step is 2^-9 * scale
    bound = 2.0 ** -4 * w.abs() + 2.0 ** -9 * s_elem
    assert ((dq - w).abs() <= bound).all()
    assert (dq - w).abs().max() > 0  # really quantized


def test_int4_pack_is_lowest_nibble_first():
    q = torch.arange(-8, 8, dtype=torch.int8).view(2, 8)  # nibbles 0..7 and 8..15
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (2, 1)
    assert packed[0, 0].item() == 0x76543210 and packed[1, 0].item() == 0xFEDCBA98 - 2**32
    assert torch.equal(quant.unpack_int4(packed, 8), q)


def test_int4_group_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 70, generator=g)  # 70: neither a multiple of 8 nor of the group
    packed, scale, shape = quant.quantize_int4_group(w, 32)
    assert packed.shape == (10, 9) and scale.shape == (10, 3) and scale.dtype == torch.bfloat16
    assert shape.tolist() == [10, 70]
    dq = quant.dequantize_int4_group(packed, scale, shape, 32)
    s_elem = scale.float().repeat_interleave(32, 1)[:, :70]
    assert ((dq - w).abs() <= s_elem / 2 + 1e-6).all()  # round to nearest: half a step
    assert (dq - w).abs().max() > 0.01


# Errors: one line, naming the file and the tensor or field -----------------------------------------

def _copy(tiny_dirs, arch, tmp_path):
    return shutil.copytree(tiny_dirs[arch], tmp_path / arch)


def _error(d, *needles):
    with pytest.raises(ModelLoadError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_error_unknown_model_type(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs, "qwen3_moe", tmp_path)
    _edit_config(d, lambda c: c.update(model_type="llama"))
    _error(d, "config.json", "'llama'", "deepseek_v3", "kimi_k25", "qwen3_moe")


def test_error_config_unreadable_or_missing(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs, "qwen3_moe", tmp_path)
    (d / "config.json").write_text('{"model_type": "qwen3_moe",')
    _error(d, "config.json", "unreadable")
    (d / "config.json").unlink()
    _error(d, "config.json", "not found")


def test_error_missing_config_field(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs, "deepseek_v3", tmp_path)
    _edit_config(d, lambda c: c.pop("kv_lora_rank"))
    _error(d, "config.json", "kv_lora_rank")
    k = _copy(tiny_dirs, "kimi_k25", tmp_path)
    _edit_config(k, lambda c: c["text_config"].pop("rms_norm_eps"))
    _error(k, "config.json", "rms_norm_eps")


@pytest.mark.parametrize("arch, edit, says", [
    ("deepseek_v3", lambda c: c.setdefault("quantization_config", {"quant_method": "fp8"}).update(
        weight_block_size=[0, 0]), "weight_block_size must be two positive integers"),
    ("deepseek_v3", lambda c: c.setdefault("quantization_config", {"quant_method": "fp8"}).update(
        weight_block_size="128"), "weight_block_size must be two positive integers"),
    ("qwen3_moe", lambda c: c.update(rms_norm_eps=-1e-6), "rms_norm_eps must be a positive number"),
    ("qwen3_moe", lambda c: c.update(num_experts_per_tok=99), "num_experts_per_tok 99 must be in 1..num_experts"),
])
def test_error_config_value_out_of_range(tiny_dirs, tmp_path, capfd, arch, edit, says):
    """Out-of-range values are refused at load, one line naming the field (no ZeroDivisionError,
    TypeError or torch log from deep inside the model)."""
    d = _copy(tiny_dirs, arch, tmp_path)
    _edit_config(d, edit)
    _error(d, "config.json", says)
    assert capfd.readouterr().err == ""


def test_error_bad_config_value(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs, "deepseek_v3", tmp_path)
    _edit_config(d, lambda c: c.update(topk_method="aux_free"))
    _error(d, "config.json", "topk_method", "aux_free")


def test_error_missing_tensor(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs, "qwen3_moe", tmp_path)  # single file
    name = "model.layers.1.self_attn.k_norm.weight"
    tensors = load_file(str(d / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(d / "model.safetensors"))
    _error(d, "model.safetensors", name, "missing")
    s = _copy(tiny_dirs, "deepseek_v3", tmp_path)  # sharded: the index no longer lists it
    name = "model.layers.2.mlp.experts.6.down_proj.weight"
    _edit_index(s, lambda wm: wm.pop(name))
    _error(s, "model.safetensors.index.json", name)


def _edit_index(d, fn):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    fn(index["weight_map"])
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_error_misshaped_tensor(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs, "qwen3_moe", tmp_path)
    name = "model.layers.2.self_attn.q_proj.weight"
    tensors = load_file(str(d / "model.safetensors"))
    tensors[name] = tensors[name].t().contiguous()
    save_file(tensors, str(d / "model.safetensors"))
    _error(d, "model.safetensors", name, "[64, 128]", "expected [128, 64]")
    k = _copy(tiny_dirs, "kimi_k25", tmp_path)  # int4: the recorded weight_shape disagrees
    name = "language_model.model.layers.1.mlp.experts.2.down_proj.weight_shape"
    file = json.loads((k / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(k / file))
    tensors[name] = torch.tensor([64, 40])
    save_file(tensors, str(k / file))
    _error(k, file, name, "expected [64, 32]")


def test_error_missing_shard_file(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs, "deepseek_v3", tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    _error(d, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "model.layers.")
