"""Tiny seeded checkpoints with the real config field names, tensor names and on-disk formats.

    python -m tbo_compiler.models.tiny ARCH OUT_DIR [--seed N] [--layers N] [--experts N]

ARCH: deepseek_v3 (fp8 block weights, MTP layer, 2 shards), deepseek_v2 (V2-Lite style: plain
q_proj, softmax group_limited_greedy), kimi_k25 (wrapper config, `language_model.` names, int4
routed experts, 2 shards), qwen3_moe, gpt_oss (sinks, a sliding window of 4 on layer 0, biases,
all experts of a layer in one MXFP4 tensor with gate/up rows interleaved, uint8 blocks/scales,
2 shards), mixtral (block_sparse_moe w1/w2/w3). The names are written out here from MODELS.md rather than
derived from the models' CHECKPOINT_NAMES, so a wrong template there fails the loader tests.
Weights are scaled so activations stay O(1) and routing is not degenerate.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tbo_compiler.models import quant

ARCHS = ("deepseek_v3", "deepseek_v2", "kimi_k25", "qwen3_moe", "gpt_oss", "mixtral")

_YARN = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}
_DSV3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 192, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_nextn_predict_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 4,
    "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
    "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": _YARN, "attention_bias": False,
    "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True,
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}
_DSV2 = {
    **{k: v for k, v in _DSV3.items() if k not in ("quantization_config", "num_nextn_predict_layers", "ep_size")},
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "q_lora_rank": None,
    "n_shared_experts": 2, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    "scoring_func": "softmax", "topk_method": "group_limited_greedy", "pretraining_tp": 1,
    "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
}
_KIMI_TEXT = {
    **{k: v for k, v in _DSV3.items() if k != "quantization_config"},
    "model_type": "kimi_k2", "num_nextn_predict_layers": 0, "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 2, "routed_scaling_factor": 2.827, "rope_theta": 50000.0,
    "rope_scaling": {**_YARN, "factor": 64.0, "beta_fast": 1.0, "beta_slow": 1.0},
}
_KIMI = {
    "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
    "text_config": _KIMI_TEXT, "vision_config": {"model_type": "moonvit", "hidden_size": 16},
    "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                      "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                                  "group_size": 32, "dynamic": False, "actorder": None,
                                                  "block_structure": None, "observer": "minmax", "observer_kwargs": {}}}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
                   "re:vision_tower.*", "re:mm_projector.*"],
        "kv_cache_scheme": None},
}
_QWEN3 = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [0],  # the real model has none; one dense layer exercises the path
    "hidden_act": "silu", "max_position_embeddings": 4096, "max_window_layers": 3,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "attention_bias": False, "attention_dropout": 0.0, "sliding_window": None, "use_sliding_window": False,
    "output_router_logits": False, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
    "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
}
_GPT_OSS = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,  # H * Dh != hidden, as in the real one
    "num_local_experts": 8, "num_experts_per_tok": 4, "experts_per_token": 4,
    "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
    "attention_bias": True, "attention_dropout": 0.0, "hidden_act": "silu", "swiglu_limit": 7.0,
    "rms_norm_eps": 1e-5, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "initial_context_length": 4096, "max_position_embeddings": 131072, "initializer_range": 0.02,
    "router_aux_loss_coef": 0.9, "output_router_logits": False, "tie_word_embeddings": False,
    "use_cache": True, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}
_MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "hidden_act": "silu",
    "max_position_embeddings": 32768, "initializer_range": 0.02, "router_aux_loss_coef": 0.02,
    "output_router_logits": False, "router_jitter_noise": 0.0, "attention_dropout": 0.0,
    "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
_CONFIGS = {"deepseek_v3": _DSV3, "deepseek_v2": _DSV2, "kimi_k25": _KIMI, "qwen3_moe": _QWEN3,
            "gpt_oss": _GPT_OSS, "mixtral": _MIXTRAL}
_EXPERTS_FIELD = {"qwen3_moe": "num_experts", "gpt_oss": "num_local_experts", "mixtral": "num_local_experts"}


class _Init:
    """Seeded fp32 tensors: (name, tensor, kind) with kind in linear / expert / norm / other."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.out: list[tuple[str, torch.Tensor, str]] = []

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g)

    def linear(self, name, o, i, kind="linear", gain=1.0):
        self.out.append((name, self.randn(o, i) * gain / i ** 0.5, kind))  # unit-variance outputs

    def norm(self, name, dim):
        self.out.append((name, 1 + 0.1 * self.randn(dim), "norm"))

    def other(self, name, t):
        self.out.append((name, t, "other"))


def _swiglu(init: _Init, p: str, d: int, inter: int, kind="linear"):
    init.linear(f"{p}.gate_proj.weight", inter, d, kind)
    init.linear(f"{p}.up_proj.weight", inter, d, kind)
    init.linear(f"{p}.down_proj.weight", d, inter, kind, gain=0.5)  # residual branch: keep the stream O(1)


def _deepseek_tensors(c: dict, init: _Init) -> None:
    D, H, V = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    qk, C, R = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    E, mI = c["n_routed_experts"], c["moe_intermediate_size"]
    init.other("model.embed_tokens.weight", init.randn(V, D))
    for i in range(c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{i}"
        init.norm(f"{p}.input_layernorm.weight", D)
        init.norm(f"{p}.post_attention_layernorm.weight", D)
        a = f"{p}.self_attn"
        if c["q_lora_rank"]:
            init.linear(f"{a}.q_a_proj.weight", c["q_lora_rank"], D)
            init.norm(f"{a}.q_a_layernorm.weight", c["q_lora_rank"])
            init.linear(f"{a}.q_b_proj.weight", H * qk, c["q_lora_rank"])
        else:
            init.linear(f"{a}.q_proj.weight", H * qk, D)
        init.linear(f"{a}.kv_a_proj_with_mqa.weight", C + R, D)
        init.norm(f"{a}.kv_a_layernorm.weight", C)
        init.linear(f"{a}.kv_b_proj.weight", H * (qk - R + c["v_head_dim"]), C)
        init.linear(f"{a}.o_proj.weight", D, H * c["v_head_dim"], gain=0.5)
        if i < c["first_k_dense_replace"] or i % c["moe_layer_freq"]:
            _swiglu(init, f"{p}.mlp", D, c["intermediate_size"])
        else:
            init.linear(f"{p}.mlp.gate.weight", E, D, kind="other")
            if c["topk_method"] == "noaux_tc":
                init.other(f"{p}.mlp.gate.e_score_correction_bias", 0.1 * init.randn(E))
            for e in range(E):
                _swiglu(init, f"{p}.mlp.experts.{e}", D, mI, kind="expert")
            if c["n_shared_experts"]:
                _swiglu(init, f"{p}.mlp.shared_experts", D, c["n_shared_experts"] * mI)
        if i >= c["num_hidden_layers"]:  # the MTP layer's own modules
            init.norm(f"{p}.enorm.weight", D)
            init.norm(f"{p}.hnorm.weight", D)
            init.linear(f"{p}.eh_proj.weight", D, 2 * D)
            init.other(f"{p}.embed_tokens.weight", init.randn(V, D))
            init.norm(f"{p}.shared_head.norm.weight", D)
            init.linear(f"{p}.shared_head.head.weight", V, D, kind="other")
    init.norm("model.norm.weight", D)
    init.linear("lm_head.weight", V, D, kind="other")


def _gqa_attention(init: _Init, a: str, D: int, H: int, G: int, Dh: int, bias: bool = False) -> None:
    """q/k/v/o projections of grouped-query attention under prefix `a` (e.g. model.layers.0.self_attn)."""
    for proj, o, fan_in in (("q", H * Dh, D), ("k", G * Dh, D), ("v", G * Dh, D), ("o", D, H * Dh)):
        init.linear(f"{a}.{proj}_proj.weight", o, fan_in, gain=0.5 if proj == "o" else 1.0)
        if bias:
            init.other(f"{a}.{proj}_proj.bias", 0.1 * init.randn(o))


def _qwen3_tensors(c: dict, init: _Init) -> None:
    D, V, Dh = c["hidden_size"], c["vocab_size"], c["head_dim"]
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    init.other("model.embed_tokens.weight", init.randn(V, D))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        init.norm(f"{p}.input_layernorm.weight", D)
        init.norm(f"{p}.post_attention_layernorm.weight", D)
        _gqa_attention(init, f"{p}.self_attn", D, H, G, Dh)
        init.norm(f"{p}.self_attn.q_norm.weight", Dh)
        init.norm(f"{p}.self_attn.k_norm.weight", Dh)
        if i in c["mlp_only_layers"] or (i + 1) % c["decoder_sparse_step"]:
            _swiglu(init, f"{p}.mlp", D, c["intermediate_size"])
        else:
            init.linear(f"{p}.mlp.gate.weight", c["num_experts"], D, kind="other")
            for e in range(c["num_experts"]):
                _swiglu(init, f"{p}.mlp.experts.{e}", D, c["moe_intermediate_size"], kind="expert")
    init.norm("model.norm.weight", D)
    init.linear("lm_head.weight", V, D, kind="other")


def _gpt_oss_tensors(c: dict, init: _Init) -> None:
    D, V, Dh, I, E = c["hidden_size"], c["vocab_size"], c["head_dim"], c["intermediate_size"], c["num_local_experts"]
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    init.other("model.embed_tokens.weight", init.randn(V, D))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        init.norm(f"{p}.input_layernorm.weight", D)
        init.norm(f"{p}.post_attention_layernorm.weight", D)
        _gqa_attention(init, f"{p}.self_attn", D, H, G, Dh, bias=True)
        init.other(f"{p}.self_attn.sinks", init.randn(H))  # logits of the scores' order
        init.linear(f"{p}.mlp.router.weight", E, D, kind="other")
        init.other(f"{p}.mlp.router.bias", 0.1 * init.randn(E))
        gate, up = init.randn(E, I, D) / D ** 0.5, init.randn(E, I, D) / D ** 0.5
        # on disk: gate and up rows interleaved (gate = rows 0, 2, ..., up = rows 1, 3, ...)
        init.out.append((f"{p}.mlp.experts.gate_up_proj", torch.stack([gate, up], 2).reshape(E, 2 * I, D), "mxfp4"))
        bias = 0.1 * init.randn(E, 2, I)
        init.other(f"{p}.mlp.experts.gate_up_proj_bias", bias.transpose(1, 2).reshape(E, 2 * I))
        init.out.append((f"{p}.mlp.experts.down_proj", init.randn(E, D, I) * 0.5 / I ** 0.5, "mxfp4"))
        init.other(f"{p}.mlp.experts.down_proj_bias", 0.1 * init.randn(E, D))
    init.norm("model.norm.weight", D)
    init.linear("lm_head.weight", V, D, kind="other")


def _mixtral_tensors(c: dict, init: _Init) -> None:
    D, V, I, E = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_local_experts"]
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    Dh = c.get("head_dim") or D // H
    init.other("model.embed_tokens.weight", init.randn(V, D))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        init.norm(f"{p}.input_layernorm.weight", D)
        init.norm(f"{p}.post_attention_layernorm.weight", D)
        _gqa_attention(init, f"{p}.self_attn", D, H, G, Dh)
        m = f"{p}.block_sparse_moe"
        init.linear(f"{m}.gate.weight", E, D, kind="other")
        for e in range(E):
            init.linear(f"{m}.experts.{e}.w1.weight", I, D, kind="expert")
            init.linear(f"{m}.experts.{e}.w3.weight", I, D, kind="expert")
            init.linear(f"{m}.experts.{e}.w2.weight", D, I, kind="expert", gain=0.5)
    init.norm("model.norm.weight", D)
    init.linear("lm_head.weight", V, D, kind="other")


_TENSORS = {"qwen3_moe": _qwen3_tensors, "gpt_oss": _gpt_oss_tensors, "mixtral": _mixtral_tensors}


def _encode(arch: str, name: str, t: torch.Tensor, kind: str, group_size: int) -> dict:
    """One fp32 tensor -> its on-disk tensors for `arch`."""
    if name.endswith("e_score_correction_bias"):
        return {name: t.float()}
    if kind == "mxfp4":
        blocks, scales = quant.quantize_mxfp4(t)
        return {name + "_blocks": blocks, name + "_scales": scales}
    if arch == "deepseek_v3" and kind in ("linear", "expert") and ".layers." in name:
        q, s = quant.quantize_fp8_block(t)
        return {name: q, name + "_scale_inv": s}
    if arch == "kimi_k25" and kind == "expert":
        packed, scale, shape = quant.quantize_int4_group(t, group_size)
        base = name.removesuffix(".weight")
        return {base + ".weight_packed": packed, base + ".weight_scale": scale, base + ".weight_shape": shape}
    return {name: t.to(torch.bfloat16)}


def make_tiny(arch: str, out_dir, seed: int = 0, shards: int | None = None, **overrides) -> Path:
    """Write a tiny checkpoint of `arch` to `out_dir`; `overrides` replace (text) config fields."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; have {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(_CONFIGS[arch])
    text = config["text_config"] if arch == "kimi_k25" else config
    text.update(overrides)
    if arch == "gpt_oss" and "layer_types" not in overrides:  # alternate, sliding first, as HF's default
        text["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(text["num_hidden_layers"])]
    init = _Init(seed)
    _TENSORS.get(arch, _deepseek_tensors)(text, init)
    prefix = "language_model." if arch == "kimi_k25" else ""
    if arch == "kimi_k25":  # a vision tower the text loader must leave alone
        init.other("vision_tower.patch_embed.proj.weight", init.randn(16, 3, 2, 2))
    tensors: dict[str, torch.Tensor] = {}
    for name, t, kind in init.out:
        full = name if name.startswith("vision_tower") else prefix + name
        tensors.update(_encode(arch, full, t, kind, group_size=32))
    shards = shards or (2 if arch in ("deepseek_v3", "kimi_k25", "gpt_oss") else 1)
    _write(out, tensors, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _write(out: Path, tensors: dict, shards: int) -> None:
    names = list(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out / "model.safetensors"), {"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k * per:(k + 1) * per]}
        save_file(part, str(out / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", choices=ARCHS)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="num_hidden_layers")
    ap.add_argument("--experts", type=int, help="routed experts (n_routed_experts / num_experts)")
    a = ap.parse_args(argv)
    over = {}
    if a.layers is not None:
        over["num_hidden_layers"] = a.layers
    if a.experts is not None:
        over[_EXPERTS_FIELD.get(a.arch, "n_routed_experts")] = a.experts
    print(make_tiny(a.arch, a.out_dir, seed=a.seed, **over))


if __name__ == "__main__":
    main()
