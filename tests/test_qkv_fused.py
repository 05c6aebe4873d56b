"""GQAAttention's one q|k|v GEMM (qkv_proj) for Qwen3-MoE, GPT-OSS and Mixtral.

  1. loading: qkv_proj's rows are the checkpoint's q_proj, k_proj, v_proj (and biases) one after
     the other, for parts of unequal sizes (loader RowParts), fp8-block parts dequantized at their
     own shapes; a k_proj of the wrong shape is one ModelLoadError line naming it;
  2. the forward: one GEMM before the attention, and the same output and cache as the three GEMMs
     it replaces, on the same weights, through both paths (tbo.qk_rope_kv and the separate ops).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.fx.experimental.proxy_tensor import make_fx

from tbo_compiler.models import ModelLoadError, load_model, quant
from tbo_compiler.models.attention import GQAAttention

from test_new_archs import _disk

ops = torch.ops.tbo
ARCHS = ["qwen3_moe", "gpt_oss", "mixtral"]
BIAS = {"qwen3_moe": False, "gpt_oss": True, "mixtral": False}


def _qkv_from_disk(disk: dict, layer: int, what: str = "weight") -> list[torch.Tensor]:
    return [disk[f"model.layers.{layer}.self_attn.{p}_proj.{what}"].float() for p in "qkv"]


# 1. loading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_qkv_proj_rows_are_the_checkpoint_q_k_v(tiny_dirs, tiny_models, arch):
    disk, model = _disk(tiny_dirs[arch]), tiny_models[arch]
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        H, G, Dh = attn.H, attn.G, attn.Dh
        assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert attn.qkv_proj.weight.shape == ((H + 2 * G) * Dh, model.config.hidden_size)
        q, k, v = _qkv_from_disk(disk, i)
        assert (q.shape[0], k.shape[0], v.shape[0]) == (H * Dh, G * Dh, G * Dh) and H > G  # unequal parts
        assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
        if BIAS[arch]:
            assert torch.equal(attn.qkv_proj.bias, torch.cat(_qkv_from_disk(disk, i, "bias")))
        else:
            assert attn.qkv_proj.bias is None


def test_fp8_block_q_k_v_dequantized_at_their_own_shapes(tiny_dirs, tmp_path):
    """Blocks of 32 rows: q [128, 64] has 4 scale rows, k and v [64, 64] 2 each; reading a part at
    the concatenation's shape (or at another part's) would fail the scale-shape check."""
    d = shutil.copytree(tiny_dirs["qwen3_moe"], tmp_path / "fp8")
    tensors, want = load_file(str(d / "model.safetensors")), {}
    for i in range(3):
        parts = []
        for p in "qkv":
            name = f"model.layers.{i}.self_attn.{p}_proj.weight"
            w8, s = quant.quantize_fp8_block(tensors[name].float(), (32, 32))
            tensors[name], tensors[name + "_scale_inv"] = w8, s
            parts.append(quant.dequantize_fp8_block(w8, s, (32, 32)))
        want[i] = torch.cat(parts)
    save_file(tensors, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [32, 32]}
    (d / "config.json").write_text(json.dumps(cfg))
    model = load_model(d)
    for i, w in want.items():
        assert torch.equal(model.layers[i].self_attn.qkv_proj.weight, w)
    assert not torch.equal(want[0][:128], _qkv_from_disk(_disk(tiny_dirs["qwen3_moe"]), 0)[0])  # really fp8


@pytest.mark.parametrize("arch, what", [("qwen3_moe", "weight"), ("gpt_oss", "bias")])
def test_misshaped_k_proj_is_one_line_naming_it(tiny_dirs, tmp_path, arch, what):
    """k_proj with q_proj's rows: the parts are checked one by one, at k's own shape."""
    d = shutil.copytree(tiny_dirs[arch], tmp_path / arch)
    name, q_name = (f"model.layers.1.self_attn.{p}_proj.{what}" for p in "kq")
    files = {f.name: f for f in d.glob("*.safetensors")}
    file = next(f for f in files if name in load_file(str(files[f])))
    tensors = load_file(str(files[file]))
    want = list(tensors[name].shape)
    tensors[name] = torch.cat([tensors[name], tensors[name]])  # G*Dh -> 2*G*Dh = H*Dh rows here
    save_file(tensors, str(files[file]))
    with pytest.raises(ModelLoadError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert f"{file}: tensor {name} has shape {list(tensors[name].shape)}, expected {want}" in msg, msg
    assert q_name not in msg


# 2. the forward ---------------------------------------------------------------------------------

class _ThreeGemms(torch.nn.Module):
    """What qkv_proj replaced: q, k and v each their own GEMM, joined along the columns (the forward
    after it reads q, k, v as views of those columns either way)."""

    def __init__(self, ws, bs):
        super().__init__()
        self.ws, self.bs = ws, bs

    def forward(self, x):
        return torch.cat([F.linear(x, w, b) for w, b in zip(self.ws, self.bs)], 1)


@pytest.mark.parametrize("path", ["qk_rope_kv", "separate_ops"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_attention_equals_three_gemms(tiny_dirs, tiny_models, arch, path):
    disk, model = _disk(tiny_dirs[arch]), tiny_models[arch]
    attn = model.layers[0].self_attn
    wq, wk, wv = _qkv_from_disk(disk, 0)
    bq, bk, bv = _qkv_from_disk(disk, 0, "bias") if BIAS[arch] else (None,) * 3
    rope = model.rope
    if path == "separate_ops":  # a plain callable: GQAAttention runs the norm, rope and stack ops
        rope = lambda x, pos, f=rope.inv_freq: ops.rope_half(x, pos, f)  # noqa: E731
    T, S = 11, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, model.config.hidden_size, generator=g)
    pos, slots = torch.arange(T) + 2, torch.arange(T) + 2
    table = torch.arange(S // model.block_size).view(1, -1).expand(T, -1)
    entry = model.cache_entry_shape(0)
    caches = [torch.zeros(S, *entry), torch.zeros(S, *entry)]
    got = attn(x, pos, slots, table, caches[0], rope)
    fused = attn.qkv_proj
    try:
        attn.qkv_proj = _ThreeGemms((wq, wk, wv), (bq, bk, bv))
        want = attn(x, pos, slots, table, caches[1], rope)
    finally:
        attn.qkv_proj = fused
    # the same dot products; a CPU BLAS may only block the columns differently (observed: bitwise)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[0], caches[1], rtol=1e-6, atol=1e-6)
    assert caches[0][slots].abs().sum() > 0 and got.abs().max() > 1e-3

    # one GEMM for q|k|v, then o_proj; the path the test meant to take
    gm = make_fx(lambda *a: attn(*a, rope))(x, pos, slots, table, torch.zeros(S, *entry))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    gemms = [t for t in targets if t in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
    assert len(gemms) == 2, targets
    assert (ops.qk_rope_kv.default in targets) == (path == "qk_rope_kv")
