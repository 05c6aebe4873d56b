"""Compute against the roofline on one GPU: measured time, the floor, and where the time goes.

    python bench/roofline.py --compile-only --plans /tmp/plans        # CPU machine: every plan, no GPU
    python bench/roofline.py --plans /tmp/plans --out $OUT            # GPU: all models, all buckets
    python bench/roofline.py --plans /tmp/plans --out $OUT --models qwen3_30b_a3b \\
        --buckets prefill:4096 decode:256 --layers 4 --iters 5        # a quick look
    python bench/roofline.py --device cpu --tiny --out /tmp/rl        # smoke run: tiny dims, fp32, CPU

Models (`--models`, comma separated): gpt_oss_20b, qwen3_30b_a3b, mixtral_8x7b at their real config
dims and full depth (random bf16 weights, EP=1, experts unquantised), and deepseek_v3_slice
(bench/tbo_bench.py's SLICE: 4 layers of DeepSeek-V3's shapes, 8 routed experts at EP=1).
Buckets (`--buckets`): prefill T = T/512 requests of 512 new tokens, decode T = T requests of one
token after a 512-token context; default prefill:1024,4096,16384 decode:64,256,512.

Per model and bucket:
  floor     max(FLOPs / PEAK_FLOPS, bytes / PEAK_HBM) from the config (`floors`, counted below);
            `sustained_floor_ms` the same at what the GPU sustains (SUSTAINED_FLOPS, SUSTAINED_HBM),
            `pct_of_sustained` = sustained floor / serial
  serial    the plan's one-ubatch program, CUDA graph (the runtime captures it), CUDA events:
            --warmup calls, then the median of --iters single calls, each started on an idle GPU (so
            it includes the host's graph launch, ~1-2 us a graph node, before the first kernel);
            `serial_b2b_ms`: the mean of --iters calls back to back (3 blocks), as a serving loop
            runs steps, each launch overlapping the replay before it
  tbo       the plan's two-ubatch program, the same way
  (every call with copy_output=False: the program alone, the logits not copied out of the graph)
  memory    peak allocated around the first call of each (the graph capture included), the memory
            reserved after it, and what was allocated before (weights + KV cache)
  correct   max|serial - eager| / max|eager|, max|tbo - eager_halves| / max|eager_halves| (bf16), with
            eager_halves the model's own forward on TBO's two ubatches one after the other
  profile   (--profile, default on) each op of one serial step timed alone (runtime/profile.py
            measure_ops), summed per op family (attention, moe_experts, routing, dense_gemm,
            lm_head, norms_rope_act, kv_write, other), the top 10 nodes; --trace adds a
            torch.profiler Chrome trace of one replay of the serial program.
  clock     the SM clock and board power nvidia-smi samples (every 50 ms, read only) during the
            single calls, the back-to-back calls and the trace (`serial_clock`, `serial_b2b_clock`,
            `trace_clock`): a step traced alone can run at a higher clock than the same step timed
            in a loop at the GPU's power cap.
Plans: one file per (model, layers, phase, bucket, dtype) in --plans; --compile-only writes the
missing ones and exits (plan compilation is CPU work: do it before taking the GPU); a run compiles
only what is missing. Models run one at a time and are freed before the next; each row is printed
as JSON when done and DIR/roofline.json + DIR/roofline.md are rewritten after every row.

`--device cpu --tiny`: 2-layer tiny dims of each model family, fp32, requests of 16 tokens over a
16-token context, wall-clock timing (no CUDA graphs on CPU) and per-op wall-clock times; the same
code path otherwise (tests/test_roofline.py runs it).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tbo_bench import GPT_OSS_SLICE, SLICE, random_model  # noqa: E402  shared with the TBO bench

# H200 peaks (/work/shared/reference/PHYSICAL_LIMITS.md): dense bf16 (an 8192^3 GEMM through torch
# measures 770-800 TFLOP/s) and HBM3e bandwidth
PEAK_FLOPS = 790e12
PEAK_HBM = 4.8e12
# What one H200 sustains as a step runs (bench/results/moe_h200/peak_gemm.json, moe_bench.py --peak
# and --hbm): an 8192^3 GEMM on normal-distributed operands back to back, 668 TFLOP/s at the 700 W
# power cap (1.5 GHz; 790 is reached only with low-power operands such as all ones), and a read-only
# stream, 4.16 TB/s. The goals are set against the peaks above; `pct_of_sustained` says how far a
# step is from what the GPU gives when it runs at all.
SUSTAINED_FLOPS = 668e12
SUSTAINED_HBM = 4.16e12

# Models: the real configs (/work/shared/reference/MODELS.md), experts unquantised -------------------

# GPT-OSS-20B: the TBO bench's slice at full depth, with the real vocabulary
GPT_OSS_20B = {**GPT_OSS_SLICE, "num_hidden_layers": 24, "layer_types": ["sliding_attention", "full_attention"] * 12,
               "vocab_size": 201088}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "attention_bias": False, "tie_word_embeddings": False,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
}
DEEPSEEK_V3_SLICE = {**SLICE, "n_routed_experts": 8}  # tbo_bench's slice at EP=1: 8 experts, 4 layers

MODELS = {"gpt_oss_20b": GPT_OSS_20B, "qwen3_30b_a3b": QWEN3_30B_A3B, "mixtral_8x7b": MIXTRAL_8X7B,
          "deepseek_v3_slice": DEEPSEEK_V3_SLICE}

# --tiny: the same architectures at toy dims, 2 layers (vocab 256, hidden 64)
_TINY_GQA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "vocab_size": 256}
TINY = {
    "gpt_oss_20b": {**GPT_OSS_20B, **_TINY_GQA, "intermediate_size": 32, "num_local_experts": 8,
                    "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_30b_a3b": {**QWEN3_30B_A3B, **_TINY_GQA, "intermediate_size": 128, "moe_intermediate_size": 32,
                      "num_experts": 16, "num_experts_per_tok": 4},
    "mixtral_8x7b": {**MIXTRAL_8X7B, **{k: v for k, v in _TINY_GQA.items() if k != "head_dim"},
                     "intermediate_size": 32},
    "deepseek_v3_slice": {**DEEPSEEK_V3_SLICE, "hidden_size": 64, "intermediate_size": 128,
                          "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                          "qk_rope_head_dim": 8, "v_head_dim": 16, "num_experts_per_tok": 4, "vocab_size": 256},
}


@dataclass(frozen=True)
class Shape:
    """The batch shapes: requests of `req_len` new tokens (prefill), or one token after `ctx` (decode)."""
    req_len: int = 512
    ctx: int = 512
    block: int = 64
    max_blocks: int = 16


FULL, TINY_SHAPE = Shape(), Shape(req_len=16, ctx=16, block=4, max_blocks=8)
DEFAULT_BUCKETS = {"prefill": [1024, 4096, 16384], "decode": [64, 256, 512]}
TINY_BUCKETS = {"prefill": [32, 64], "decode": [8, 16]}


# Step 1: floors from the config ---------------------------------------------------------------

def with_layers(cfg: dict, layers: int | None) -> dict:
    """The config cut to `layers` decoder layers (GPT-OSS's layer_types cut with it)."""
    if not layers:
        return dict(cfg)
    out = {**cfg, "num_hidden_layers": layers}
    if cfg.get("layer_types"):
        out["layer_types"] = cfg["layer_types"][:layers]
    return out


def _layer_kinds(c: dict) -> list[tuple[bool, int]]:
    """Per layer: (is MoE, sliding window or 0), as the model files decide them."""
    L, mt = c["num_hidden_layers"], c["model_type"]
    out = []
    for i in range(L):
        if mt == "deepseek_v3":
            moe = i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0
        elif mt == "qwen3_moe":
            moe = i not in c.get("mlp_only_layers", []) and (i + 1) % c.get("decoder_sparse_step", 1) == 0
        else:
            moe = True
        window = c["sliding_window"] if (c.get("layer_types") or [""] * L)[i] == "sliding_attention" else 0
        out.append((moe, window))
    return out


def expected_experts_touched(E: int, k: int, T: int) -> float:
    """Distinct experts that T tokens, each routed to k of E uniformly at random, touch (one layer):
    an expert is missed by one token with probability 1 - k/E."""
    return E * (1.0 - (1.0 - k / E) ** T)


def _keys_attended(phase: str, T: int, window: int, shape: Shape) -> int:
    """(query, key) pairs of one head over the whole batch: prefill is causal inside each request of
    req_len new tokens (query i sees min(i+1, window) keys), decode sees its ctx keys and itself."""
    W = window or 10**12
    if phase == "prefill":
        n_req = T // shape.req_len
        return n_req * sum(min(i + 1, W) for i in range(shape.req_len))
    return T * min(shape.ctx + 1, W)


def floors(cfg: dict, phase: str, T: int, shape: Shape = FULL, bytes_per_param: int = 2) -> dict:
    """FLOPs and bytes one forward of T tokens must at least move, each term written out.

    FLOPs (2 per multiply-add), per token per layer:
      attention projections  GQA: q (D x H*Dh), k and v (D x G*Dh), o (H*Dh x D);
                             MLA (absorbed, as models/deepseek_v3.py runs prefill and decode):
                             q_a (D x q_lora), q_b (q_lora x H*(N+R)), kv_a (D x C+R), the W_UK and
                             W_UV absorption (= kv_b: C x H*(N+Dv)), o (H*Dv x D)
      router                 D x E
      routed experts         top_k x 3 x D x I   (gate, up, down)
      shared experts         n_shared x 3 x D x I_moe;  dense MLP layers: 3 x D x I_dense
    plus per batch: lm_head D x V over ALL T tokens (the model computes the logits of every token,
    prefill included: models/decoder.py, and PlanModule returns them all), and attention scores:
    per (query, key) pair and head 2*Dqk (QK^T) + 2*Dv (PV); GQA Dqk = Dv = Dh; MLA absorbed
    Dqk = C+R, Dv = C. Embedding lookups, norms, rope and activations: no FLOPs counted.
    Bytes: every weight once (norms, attention, router, dense/shared MLPs, lm_head, final norm), the
    embedding rows of the T tokens, of the routed experts only those the T tokens are expected to
    touch (`expected_experts_touched`, per layer), the KV cache read (per layer and request, the keys
    attended: context+1, or the window) and written (T entries per layer). Activations not counted.
    """
    c = cfg
    D, V, mt = c["hidden_size"], c["vocab_size"], c["model_type"]
    b = bytes_per_param
    fl = dict.fromkeys(("attn_proj", "attn_scores", "router", "experts", "shared", "dense_mlp", "lm_head"), 0.0)
    by = dict.fromkeys(("attn", "norms", "router", "experts", "shared", "dense_mlp", "embed_rows", "lm_head",
                        "kv_read", "kv_write"), 0.0)
    # attention: params per layer (the FLOPs are 2 per param per token), score width, cache entry
    H = c["num_attention_heads"]
    if mt == "deepseek_v3":
        N, R, Dv, C, qr = (c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"],
                           c.get("q_lora_rank"))
        q = (D * qr + qr * H * (N + R) + qr) if qr else D * H * (N + R)  # + q_a_layernorm
        attn_params = q + D * (C + R) + C + C * H * (N + Dv) + H * Dv * D  # + kv_a_layernorm
        attn_extra = 0
        score_flops_per_pair = H * (2 * (C + R) + 2 * C)
        kv_entry = C + R
    else:
        G = c["num_key_value_heads"]
        Dh = c.get("head_dim") or D // H
        attn_params = D * H * Dh + 2 * D * G * Dh + H * Dh * D
        attn_extra = (H * Dh + 2 * G * Dh + D) if c.get("attention_bias") else 0  # biases: no FLOPs counted
        attn_extra += 2 * Dh if mt == "qwen3_moe" else 0                            # q_norm, k_norm
        attn_extra += 2 * H if mt == "gpt_oss" else 0                               # sinks (fp32)
        score_flops_per_pair = H * 4 * Dh
        kv_entry = 2 * G * Dh
    # MLPs: routed experts, shared experts, dense layers
    if mt == "deepseek_v3":
        E, I_e, I_d = c["n_routed_experts"], c["moe_intermediate_size"], c["intermediate_size"]
        n_shared = c.get("n_shared_experts") or 0
        router_params = E * D + E               # + e_score_correction_bias
    elif mt == "qwen3_moe":
        E, I_e, I_d, n_shared = c["num_experts"], c["moe_intermediate_size"], c["intermediate_size"], 0
        router_params = E * D
    else:  # gpt_oss, mixtral: intermediate_size is the expert's
        E, I_e, I_d, n_shared = c["num_local_experts"], c["intermediate_size"], c["intermediate_size"], 0
        router_params = E * D + (E if mt == "gpt_oss" else 0)
    k = c["num_experts_per_tok"]
    expert_params = 3 * D * I_e + ((2 * I_e + D) if mt == "gpt_oss" else 0)  # GPT-OSS: expert biases
    for moe, window in _layer_kinds(c):
        fl["attn_proj"] += 2 * attn_params * T
        fl["attn_scores"] += score_flops_per_pair * _keys_attended(phase, T, window, shape)
        by["attn"] += (attn_params + attn_extra) * b
        by["norms"] += 2 * D * b
        if moe:
            fl["router"] += 2 * router_params * T
            fl["experts"] += 2 * k * 3 * D * I_e * T
            fl["shared"] += 2 * n_shared * 3 * D * I_e * T
            by["router"] += router_params * b
            by["experts"] += expected_experts_touched(E, k, T) * expert_params * b
            by["shared"] += n_shared * 3 * D * I_e * b
        else:
            fl["dense_mlp"] += 2 * 3 * D * I_d * T
            by["dense_mlp"] += 3 * D * I_d * b
        # KV: prefill reads back what its requests wrote; decode reads each request's context
        n_req = T // shape.req_len if phase == "prefill" else T
        keys = _keys_attended(phase, T, window, shape) if phase == "decode" else \
            n_req * min(shape.req_len, window or shape.req_len)
        by["kv_read"] += keys * kv_entry * b
        by["kv_write"] += T * kv_entry * b
    fl["lm_head"] = 2 * D * V * T
    by["lm_head"] = (D * V + D) * b                                   # + final norm
    by["embed_rows"] = V * (1.0 - (1.0 - 1.0 / V) ** T) * D * b       # distinct token rows read
    flops, nbytes = sum(fl.values()), sum(by.values())
    ms_c, ms_m = flops / PEAK_FLOPS * 1e3, nbytes / PEAK_HBM * 1e3
    return {"flops": flops, "bytes": nbytes, "flops_terms": fl, "bytes_terms": by,
            "compute_ms": ms_c, "memory_ms": ms_m, "floor_ms": max(ms_c, ms_m),
            "sustained_floor_ms": max(flops / SUSTAINED_FLOPS, nbytes / SUSTAINED_HBM) * 1e3,
            "bound": "compute" if ms_c >= ms_m else "memory"}


# Step 2: op families of a compiled program ------------------------------------------------------

FAMILIES = ("attention", "moe_experts", "routing", "dense_gemm", "lm_head", "norms_rope_act", "kv_write", "other")
_ATTENTION = {"paged_attention", "latent_attention", "scaled_dot_product_attention",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "flash_attention"}
_EXPERTS = {"moe_experts", "_grouped_mm", "grouped_mm", "dispatch_pack", "dispatch_start", "dispatch_wait",
            "combine_start", "combine_wait"}
#: linear_f32 (fp32 out) is the routers' GEMM and the lm_head's: its weight tells which
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "einsum", "linear_f32"}
_ROUTING = {"topk", "sort", "argsort", "_softmax", "softmax", "sigmoid", "one_hot", "route_topk"}
_KV_WRITE = {"index_put", "index_put_", "copy_"}
_NORM_ACT = {"add", "sub", "mul", "div", "neg", "exp", "pow", "rsqrt", "sqrt", "mean", "sum", "clamp",
             "clamp_min", "clamp_max", "minimum", "maximum", "where", "silu", "gelu", "tanh", "sigmoid",
             "_to_copy", "convert_element_type", "masked_fill", "cos", "sin", "amax", "max", "var_mean"}
_LAYOUT = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "getitem", "slice",
           "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "cat", "stack", "clone",
           "contiguous", "alias", "unbind", "_to_copy", "convert_element_type"}
# a weight reached through these from a GEMM's operand is that GEMM's weight
_WEIGHT_PATH = {"t", "transpose", "permute", "view", "_unsafe_view", "reshape", "_to_copy", "expand", "clone",
                "convert_element_type", "slice", "select"}
_ROUTER_WEIGHTS = ("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight")


def op_name(node) -> str:
    """'aten.addmm.default' -> 'addmm', 'tbo.paged_attention.default' -> 'paged_attention'."""
    t = node.target
    s = str(t)
    if hasattr(t, "_opname"):
        return t._opname
    parts = s.split(".")
    return parts[1] if len(parts) >= 3 else getattr(t, "__name__", s)


def _weight_fqn(node, fqn_of: dict) -> str | None:
    """The parameter a GEMM multiplies by, found from its operands back through views and casts."""
    args = node.args[1:] if op_name(node) != "einsum" else node.args[1]
    for a in args:
        while hasattr(a, "op"):
            if a.op == "placeholder":
                if a.name in fqn_of:
                    return fqn_of[a.name]
                break
            if a.op != "call_function" or op_name(a) not in _WEIGHT_PATH or not a.args:
                break
            a = a.args[0]
    return None


def classify(gm, inputs) -> dict[str, str]:
    """{node name: family} for every call_function node of a program. `inputs` is the program's
    (kind, target) per placeholder (BucketProgram.inputs): it names the weight of each GEMM, which
    tells lm_head and the router apart from the other GEMMs. A node whose tensor inputs all come
    from routing (a getitem of topk, the renormalisation after it) is routing too."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fqn_of = {n.name: target for n, (kind, target) in zip(phs, inputs) if kind in ("param", "buffer")}
    fam: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        op = op_name(n)
        srcs = [a for a in n.all_input_nodes if a.op == "call_function"]
        from_routing = bool(srcs) and all(fam.get(a.name) == "routing" for a in srcs)
        if op in _ATTENTION or "attention" in op:
            f = "attention"
        elif op in _EXPERTS or "moe_experts" in op or "grouped_mm" in op:
            f = "moe_experts"
        elif op in _GEMM:
            w = _weight_fqn(n, fqn_of) or ""
            if w.endswith("lm_head.weight"):
                f = "lm_head"
            elif w.endswith(_ROUTER_WEIGHTS):
                f = "routing"
            else:
                f = "dense_gemm"
        elif op in _KV_WRITE:
            f = "kv_write"
        elif op in _ROUTING or from_routing:
            f = "routing"
        elif "norm" in op or "rope" in op or "silu" in op or op in _NORM_ACT - _LAYOUT:
            f = "norms_rope_act"
        else:
            f = "other"
        fam[n.name] = f
    return fam


def op_times_us(bp, args, device) -> dict[str, float]:
    """{node: microseconds} of one step of the program, each op alone. CUDA: runtime/profile.py's
    measure_ops (CUDA events, the GPU held while the host issues). CPU: each node's wall clock
    through an FX interpreter (measure_ops needs CUDA events)."""
    if torch.device(device).type == "cuda":
        from tbo_compiler.runtime.profile import measure_ops
        return measure_ops(bp.gm, bp.instrs, args, device)
    import torch.fx as fx

    times: dict[str, float] = {}

    class Timed(fx.Interpreter):
        def run_node(self, n):
            t0 = time.perf_counter()
            out = super().run_node(n)
            if n.op == "call_function":
                times[n.name] = (time.perf_counter() - t0) * 1e6
            return out

    with torch.no_grad():
        Timed(bp.gm).run(*args)
    return times


def family_profile(bp, args, device) -> dict:
    us = op_times_us(bp, args, device)
    fam = classify(bp.gm, bp.inputs)
    total = sum(us.values()) or 1.0
    per = {f: 0.0 for f in FAMILIES}
    for name, t in us.items():
        per[fam.get(name, "other")] += t
    targets = {n.name: str(n.target) for n in bp.gm.graph.nodes}
    top = sorted(us.items(), key=lambda kv: -kv[1])[:10]
    return {"sum_ms": round(total / 1e3, 4),
            "families_ms": {f: round(t / 1e3, 4) for f, t in per.items()},
            "families_share": {f: round(t / total, 4) for f, t in per.items()},
            "top_nodes": [{"node": n, "target": targets.get(n, "?"), "family": fam.get(n, "other"),
                           "ms": round(t / 1e3, 4)} for n, t in top]}


# Step 3: plans, model, batches -------------------------------------------------------------------

def model_dir(root: Path, name: str, cfg: dict) -> Path:
    d = root / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    p = d / "config.json"
    text = json.dumps(cfg, indent=1)
    if not p.exists() or p.read_text() != text:
        p.write_text(text)
    return d


def plan_path(root: Path, name: str, cfg: dict, phase: str, T: int, dtype: str) -> Path:
    """One bucket's plan; the name holds a hash of the config, so an edited config never reuses a stale plan."""
    h = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    return root / f"{name}_L{cfg['num_hidden_layers']}_{h}_{phase}{T}_{dtype}.pt"


def ensure_plan(root: Path, name: str, cfg: dict, phase: str, T: int, dtype, shape: Shape, profile: str) -> Path:
    """The plan of one bucket, compiled (on the meta device: CPU work) only if not on disk."""
    dt = str(dtype).removeprefix("torch.")
    p = plan_path(root, name, cfg, phase, T, dt)
    if p.exists():
        return p
    from tbo_compiler.compile import compile_model_dir
    t0 = time.perf_counter()
    compile_model_dir(model_dir(root, name, cfg), p, ep=1, mode=phase, token_counts=[T], profile=profile,
                      block_size=shape.block, max_blocks=shape.max_blocks, dtype=dtype)
    print(f"compiled {p.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return p


def synthetic_batch(phase: str, T: int, vocab: int, seed: int, device, shape: Shape):
    """bench/tbo_bench.py's flat batch over shuffled cache blocks, at `shape`'s request length."""
    g = torch.Generator().manual_seed(seed)
    n_req, new, start = (T // shape.req_len, shape.req_len, 0) if phase == "prefill" else (T, 1, shape.ctx)
    nb = -(-(start + new) // shape.block)
    tables = (torch.randperm(n_req * nb, generator=g) + 1).view(n_req, nb).int()  # block 0: null block
    pos = (start + torch.arange(new)).repeat(n_req)
    req = torch.arange(n_req).repeat_interleave(new)
    slots = tables[req, pos // shape.block].long() * shape.block + pos % shape.block
    table = torch.zeros(n_req * new, shape.max_blocks, dtype=torch.int32)
    table[:, :nb] = tables[req]
    ids = torch.randint(1, vocab, (n_req * new,), generator=g)
    return [t.to(device) for t in (ids, pos, slots, table)], n_req * nb + 1


# Step 4: measuring one bucket --------------------------------------------------------------------

def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class SmClock:
    """The GPU's SM clock (MHz) and board power (W) while a block runs, sampled by `nvidia-smi -lms
    50` (a read-only query; nothing is set): under a sustained compute load an H200 holds its power
    cap by lowering the SM clock, so a step timed back to back can run slower than the same step
    traced alone. `.result`: samples, SM clock median/min/max, power median/max; {} where nvidia-smi
    is missing or gave nothing."""

    def __init__(self, dev):
        self.dev, self.proc, self.result = dev, None, {}

    def __enter__(self):
        import shutil
        import subprocess

        if self.dev.type != "cuda" or shutil.which("nvidia-smi") is None:
            return self
        cmd = ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"]
        try:
            cmd += ["-i", f"GPU-{torch.cuda.get_device_properties(self.dev).uuid}"]
        except (AttributeError, RuntimeError):
            pass
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.1)  # its first sample
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return False
        time.sleep(0.06)
        self.proc.terminate()
        try:
            text = self.proc.communicate(timeout=5)[0]
        except Exception:  # noqa: BLE001 - a diagnosis, never the bench's failure
            self.proc.kill()
            return False
        sm, pw = [], []
        for line in text.splitlines():
            try:
                a, b = (float(x) for x in line.split(","))
            except ValueError:
                continue
            sm.append(a)
            pw.append(b)
        if sm:
            self.result = dict(samples=len(sm), sm_mhz_median=statistics.median(sm), sm_mhz_min=min(sm),
                               sm_mhz_max=max(sm), power_w_median=round(statistics.median(pw), 1),
                               power_w_max=round(max(pw), 1))
        return False


def timed_ms(fn, dev, warmup: int, iters: int) -> float:
    """Median ms of `iters` calls after `warmup`: CUDA events on the GPU, the wall clock on CPU."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    from tbo_compiler.runtime.kernels.moe_tuned import time_ms

    ms = []
    for _ in range(iters):
        if dev.type == "cuda":
            ms.append(time_ms(fn, ()))
        else:
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms)


def max_abs_diff(a, b, chunk: int = 1024) -> float:
    """max|a - b| over rows in chunks: a 16384 x 201088 fp32 logit tensor is 13 GB."""
    return max((float((a[i:i + chunk].float() - b[i:i + chunk].float()).abs().max())
                for i in range(0, a.shape[0], chunk)), default=0.0)


def max_abs(a, chunk: int = 1024) -> float:
    return max((float(a[i:i + chunk].float().abs().max()) for i in range(0, a.shape[0], chunk)), default=0.0)


def bench_bucket(name, cfg, model, progs, phase, T, opts, dev) -> dict:
    shape = opts["shape"]
    fl = floors(cfg, phase, T, shape, bytes_per_param=torch.finfo(opts["dtype"]).bits // 8)
    row = {"model": name, "phase": phase, "tokens": T, "layers": cfg["num_hidden_layers"],
           "dtype": str(opts["dtype"]).removeprefix("torch."),
           "floor_ms": round(fl["floor_ms"], 4), "sustained_floor_ms": round(fl["sustained_floor_ms"], 4),
           "flops": fl["flops"], "bytes": fl["bytes"], "bound": fl["bound"],
           "flops_terms": fl["flops_terms"], "bytes_terms": fl["bytes_terms"]}
    user, nblocks = synthetic_batch(phase, T, cfg["vocab_size"], seed=T, device=dev, shape=shape)
    kv = model.new_kv_cache(max(nblocks, 2), device=dev)
    g = torch.Generator(device=dev).manual_seed(7)
    for c in kv.caches:  # a prior context (prefill overwrites its own slots)
        c.normal_(generator=g)
    args = (*user, kv.caches)
    cuda = dev.type == "cuda"
    with torch.no_grad():
        eager = model(*args)
    scale = max(max_abs(eager), 1e-30)
    for v in ("serial", "tbo"):
        if v not in progs[T]:
            row[f"{v}_ms"] = None
            continue
        # one variant per PlanModule: its graph pool holds only this program's memory
        try:
            _bench_variant(row, v, name, model, progs, phase, T, user, kv, eager, scale, opts, dev)
        except torch.cuda.OutOfMemoryError as e:  # the serial program may not fit where TBO does
            row[f"{v}_ms"] = None
            row[f"{v}_error"] = f"out of memory: {str(e).splitlines()[0]}"
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    row["pct_of_roofline"] = round(100 * fl["floor_ms"] / row["serial_ms"], 2) if row.get("serial_ms") else None
    if row.get("serial_ms"):
        row["pct_of_sustained"] = round(100 * fl["sustained_floor_ms"] / row["serial_ms"], 2)
    if row.get("tbo_ms"):
        row["tbo_pct_of_roofline"] = round(100 * fl["floor_ms"] / row["tbo_ms"], 2)
    del kv, args, eager
    return row


def _bench_variant(row, v, name, model, progs, phase, T, user, kv, eager, scale, opts, dev) -> None:
    """One program of the bucket: first call (capture) with its memory, correctness, timing, profile."""
    from tbo_compiler.runtime.plan_module import PlanModule

    cuda, args = dev.type == "cuda", (*user, kv.caches)
    pm = PlanModule({T: {v: progs[T][v]}}, model, dev, policy=v, inductor=opts.get("inductor", False))
    _sync(dev)
    if cuda:
        torch.cuda.empty_cache()
        row[f"{v}_mem_before_gib"] = round(torch.cuda.memory_allocated(dev) / 2**30, 3)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pm(*args, variant=v, copy_output=False)  # first call: warm-up and graph capture
    _sync(dev)
    row[f"{v}_first_call_s"] = round(time.perf_counter() - t0, 2)  # Inductor compiles, MoE tuning, capture
    if cuda:
        row[f"{v}_peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        row[f"{v}_peak_over_before_gib"] = round(row[f"{v}_peak_gib"] - row[f"{v}_mem_before_gib"], 3)
        row[f"{v}_reserved_gib"] = round(torch.cuda.memory_reserved(dev) / 2**30, 3)
    # the plan's static figure (passes/memory.py), beside the measured peak of the same program
    need = getattr(progs[T][v], "need_bytes", None)
    if need is not None:
        row[f"{v}_need_gib"] = round(need / 2**30, 3)
    if v == "serial":
        row["serial_rel_diff"] = max_abs_diff(out, eager) / scale
    else:  # eager on TBO's two ubatches one after the other: the same row blocking
        cut = progs[T]["tbo"].cut
        row["tbo_cut"] = cut
        with torch.no_grad():
            h1 = model(*[u[:cut] for u in user], kv.caches)
            d1, s1 = max_abs_diff(out[:cut], h1), max_abs(h1)
            del h1
            h2 = model(*[u[cut:] for u in user], kv.caches)
            d2, s2 = max_abs_diff(out[cut:], h2), max_abs(h2)
            del h2
        row["tbo_rel_diff_vs_eager_halves"] = max(d1, d2) / max(s1, s2, 1e-30)
        row["tbo_rel_diff"] = max_abs_diff(out, eager) / scale
    del out
    with torch.no_grad():
        step = lambda: pm(*args, variant=v, copy_output=False)  # noqa: E731
        with SmClock(dev) as clock:
            row[f"{v}_ms"] = round(timed_ms(step, dev, opts["warmup"], opts["iters"]), 4)
        row[f"{v}_clock"] = clock.result
        if dev.type == "cuda":  # as a serving loop runs steps: each launch overlaps the replay before it
            from tbo_compiler.runtime.graphs import time_replays
            with SmClock(dev) as clock:
                row[f"{v}_b2b_ms"] = round(time_replays({v: step}, block=opts["iters"], rounds=3)[v], 4)
            row[f"{v}_b2b_clock"] = clock.result
            if v == "serial":
                row["launch"] = launch_costs(step, pm, T, v, args, opts["iters"])
    if v == "serial":
        user_all = list(user) + list(kv.caches)
        if opts["profile"]:
            try:  # each op alone, no graph and no in-place reuse: more memory than a replay
                with torch.no_grad():
                    row["profile"] = family_profile(progs[T]["serial"], pm.args_for(T, "serial", user_all), dev)
            except torch.cuda.OutOfMemoryError as e:
                row["profile_error"] = f"out of memory: {str(e).splitlines()[0]}"
        if opts["trace"]:
            tpath = Path(opts["out"]) / f"trace_{name}_{phase}{T}_serial.json"
            with SmClock(dev) as clock:
                row["trace"] = trace_step(lambda: pm(*args, variant="serial", copy_output=False), dev, tpath)
            row["trace_clock"] = clock.result
            row["trace_kernels"] = trace_kernels(tpath)
    del pm
    if v == "serial" and opts.get("baseline"):
        row["serial_baseline_ms"] = baseline_ms(progs[T]["serial"], T, model, args, opts, dev)
        row["baseline_env"] = opts["baseline"]
        row["serial_baseline_clock"] = opts.get("baseline_clock", {}).pop(T, {})


def launch_costs(step, pm, T: int, v: str, args, iters: int) -> dict:
    """Where a single call's time beyond its kernels goes: the host's time for the whole call
    (PlanModule: bucket choice, argument binding, the static-input check, input copies, graph
    launch) and for graph.replay() alone, neither waiting for the GPU; the GPU time of one replay
    alone (CUDA events, no Python before it); and the graph's nodes by kind from a debug capture of
    the same program (a graph that is not one straight chain of kernels launches in time that grows
    with its nodes, CUDA 12.6+ launches a straight chain in constant time)."""
    from tbo_compiler.runtime.kernels.moe_tuned import time_ms

    def host_ms(fn) -> float:
        ts = []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        return round(statistics.median(ts), 4)

    graphed = pm.buckets[T][v][3]
    g = getattr(graphed, "graph", None)
    if g is None:  # TBO_CUDA_GRAPHS=0: no graph to take apart
        return {}
    out = {"host_call_ms": host_ms(step), "host_replay_ms": host_ms(g.replay),
           "replay_alone_ms": round(statistics.median(time_ms(g.replay, ()) for _ in range(iters)), 4),
           "host_parts_ms": host_parts(pm, T, v, args, iters)}
    try:
        out["nodes"] = graph_nodes(graphed)
    except Exception as e:  # noqa: BLE001 - a diagnosis, never the bench's failure
        out["nodes_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return out


def host_parts(pm, T: int, v: str, args, iters: int) -> dict:
    """The host's time of one PlanModule call split into its steps, each timed alone (median ms, the
    GPU idle before each): binding the arguments, the static-input address check, copying the token
    inputs into the graph's buffers, graph.replay(); and the top of a cProfile of whole calls."""
    import cProfile
    import io
    import pstats

    graphed = pm.buckets[T][v][3]
    user = [*args[:4], *args[4]]
    parts: dict[str, list[float]] = {"bind": [], "check": [], "copy": [], "replay": []}
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        bound = pm.args_for(T, v, user)
        t1 = time.perf_counter()
        graphed._same_static(bound)
        t2 = time.perf_counter()
        graphed._copy_inputs(bound)
        t3 = time.perf_counter()
        graphed.graph.replay()
        t4 = time.perf_counter()
        for k, a, b in (("bind", t0, t1), ("check", t1, t2), ("copy", t2, t3), ("replay", t3, t4)):
            parts[k].append((b - a) * 1e3)
    torch.cuda.synchronize()
    out = {k: round(statistics.median(x), 4) for k, x in parts.items()}
    prof = cProfile.Profile()
    for _ in range(iters):
        torch.cuda.synchronize()
        prof.enable()
        pm(*args, variant=v, copy_output=False)
        prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(8)
    out["profile_top"] = [" ".join(line.split()) for line in buf.getvalue().splitlines()
                          if line.strip() and line.strip()[0].isdigit()][:10]
    return out


def graph_nodes(graphed) -> dict:
    """The program captured once more with CUDA's graph debug mode on and dumped as DOT: nodes by
    kind, edges, and whether it is one straight chain (each node at most one edge in and out)."""
    import re

    try:
        g = torch.cuda.CUDAGraph(keep_graph=True)  # debug_dump reads the cudaGraph_t: keep it
    except TypeError:
        g = torch.cuda.CUDAGraph()
    g.enable_debug_mode()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):  # its own pool: the plan's graphs keep theirs
        graphed.program(*graphed.run_args)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "graph.dot"
        g.debug_dump(str(path))
        text = path.read_text()
    del g
    kinds: dict[str, int] = {}
    others: list[str] = []
    for label in re.findall(r'label="(.*?)"\s*\]', text, flags=re.S):
        words = re.findall(r"[A-Za-z_]+", label)
        kind = next((w for w in words if w.isupper() and len(w) > 2), "?")
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind != "KERNEL" and len(others) < 6:
            others.append(" ".join(label.split())[:160])
    edges = re.findall(r'"?(\w+)"?\s*->\s*"?(\w+)"?', text)
    outs: dict[str, int] = {}
    ins: dict[str, int] = {}
    for a, b in edges:
        outs[a] = outs.get(a, 0) + 1
        ins[b] = ins.get(b, 0) + 1
    return {"kinds": kinds, "edges": len(edges), "not_kernels": others,
            "straight": max(outs.values(), default=0) <= 1 and max(ins.values(), default=0) <= 1}


def baseline_ms(bp, T, model, args, opts, dev) -> float:
    """The serial program rebuilt and timed with --baseline's environment (e.g. this issue's kernel
    choices off), side by side with the run above in the same process."""
    from tbo_compiler.runtime.plan_module import PlanModule

    env = {k: v for k, v in opts["baseline"].items() if k != "inductor"}
    inductor = opts["baseline"].get("inductor", "1" if opts.get("inductor") else "0") not in ("0", "false")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        pm = PlanModule({T: {"serial": bp}}, model, dev, policy="serial", inductor=inductor)
        with torch.no_grad():
            pm(*args, variant="serial", copy_output=False)
            step = lambda: pm(*args, variant="serial", copy_output=False)  # noqa: E731
            with SmClock(dev) as clock:
                ms = round(timed_ms(step, dev, opts["warmup"], opts["iters"]), 4)
            opts.setdefault("baseline_clock", {})[T] = clock.result
            return ms
    finally:
        for k, val in saved.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val


def trace_step(fn, dev, path: Path) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.no_grad():
        fn()
        _sync(dev)
        with profile(activities=acts) as prof:
            fn()
            _sync(dev)
    prof.export_chrome_trace(str(path))
    return path.name


def trace_kernels(path: Path, top: int = 25) -> dict:
    """The GPU kernels of a trace by name: total ms, count, and the share of all kernel time (what the
    CUDA graph step really spends, unlike the per-op profile, which times each op alone)."""
    try:
        events = json.loads(path.read_text()).get("traceEvents", [])
    except (OSError, ValueError):
        return {}
    per: dict[str, list[float]] = {}
    spans = []
    for ev in events:
        if ev.get("cat") == "kernel" and "dur" in ev:
            spans.append((ev["ts"], ev["ts"] + ev["dur"]))
            rec = per.setdefault(ev.get("name", "?")[:120], [0.0, 0])
            rec[0] += ev["dur"] / 1e3
            rec[1] += 1
    total = sum(r[0] for r in per.values())
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    # first kernel's start to last kernel's end: what the step costs the GPU once it has the graph
    # (the single-call time adds the host's graph launch before the first kernel)
    span = (max(e for _, e in spans) - min(b for b, _ in spans)) / 1e3 if spans else 0.0
    return {"kernel_ms": round(total, 3), "kernels": len(per), "launches": len(spans), "replay_span_ms": round(span, 3),
            "top": [{"name": k, "ms": round(v[0], 3), "count": v[1], "share": round(v[0] / total, 4) if total else 0}
                    for k, v in rows]}


# Step 5: output ----------------------------------------------------------------------------------

def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(rows: list[dict]) -> str:
    out = ["| model | case | measured ms (serial) | back to back ms | baseline ms | tbo ms | floor ms | % of roofline | "
           "% of sustained | peak over weights+KV, serial / tbo GiB | rel diff serial / tbo vs halves |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['phase']} {r['tokens']} | {r['error']} | | | | | | | | |")
            continue
        what = f"{r['flops'] / 1e12:.3g} TFLOP" if r["bound"] == "compute" else f"{r['bytes'] / 1e9:.3g} GB"
        out.append(f"| {r['model']} (L{r['layers']}) | {r['phase']} {r['tokens']} | {_f(r.get('serial_ms'))} | "
                   f"{_f(r.get('serial_b2b_ms'))} | {_f(r.get('serial_baseline_ms'))} | {_f(r.get('tbo_ms'))} | {r['floor_ms']:.3g} ({what}) | "
                   f"{_f(r.get('pct_of_roofline'), '{:.0f} %')} | {_f(r.get('pct_of_sustained'), '{:.0f} %')} | "
                   f"{_f(r.get('serial_peak_over_before_gib'))} / {_f(r.get('tbo_peak_over_before_gib'))} | "
                   f"{_f(r.get('serial_rel_diff'), '{:.1e}')} / "
                   f"{_f(r.get('tbo_rel_diff_vs_eager_halves'), '{:.1e}')} |")
    prof = [r for r in rows if "profile" in r]
    if prof:
        out += ["", "Per op family, one serial step, each op alone (ms, share of the sum):", "",
                "| model | case | sum ms | " + " | ".join(FAMILIES) + " |", "|---|---|---|" + "---|" * len(FAMILIES)]
        for r in prof:
            p = r["profile"]
            cells = [f"{p['families_ms'][f]:.2f} ({100 * p['families_share'][f]:.0f} %)" for f in FAMILIES]
            out.append(f"| {r['model']} | {r['phase']} {r['tokens']} | {p['sum_ms']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from tbo_compiler.runtime.kernels import moe_tuned
    if moe_tuned.TIMES:  # moe_experts candidates timed side by side on the buckets' own routing
        meta = {**meta, "moe_tuning_ms": moe_tuned.TIMES}
    tmp = out / "roofline.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(out / "roofline.json")
    (out / "roofline.md").write_text(markdown(rows))


def _meta(args, dev) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    return {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "device": str(dev),
            "torch": torch.__version__, "triton": triton_v, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "tiny": args.tiny,
            "peak_flops": PEAK_FLOPS, "peak_hbm_bytes_s": PEAK_HBM, "iters": args.iters, "warmup": args.warmup,
            "inductor": args.inductor}


# Step 6: driver ----------------------------------------------------------------------------------

def parse_buckets(items: list[str]) -> dict[str, list[int]]:
    """['prefill:1024,4096', 'decode:256'] -> {'prefill': [1024, 4096], 'decode': [256]}."""
    out: dict[str, list[int]] = {}
    for it in items:
        phase, _, counts = it.partition(":")
        if phase not in ("prefill", "decode") or not counts:
            raise SystemExit(f"--buckets: {it!r} is not prefill:N,N or decode:N,N")
        out.setdefault(phase, []).extend(int(x) for x in counts.split(",") if x)
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma separated, of {', '.join(MODELS)}")
    ap.add_argument("--buckets", nargs="+", default=None, help="prefill:1024,4096 decode:256 ...")
    ap.add_argument("--layers", type=int, default=None, help="cut every model to this many layers")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/roofline"))
    ap.add_argument("--plans", default=None, help="plan directory (default: a temporary one)")
    ap.add_argument("--compile-only", action="store_true", help="write the missing plans to --plans and exit")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="per op family profile of one serial step")
    ap.add_argument("--trace", action="store_true", help="torch.profiler trace of one serial replay")
    ap.add_argument("--baseline", default="", help="ENV=VAL,...: also time the serial program with this "
                    "environment, side by side (e.g. TBO_GQA_TILES=0,TBO_MOE_TUNING=off: before issue 24's kernels; "
                    "the key inductor=0|1 sets the baseline's --inductor)")
    ap.add_argument("--inductor", action="store_true", help="the plan's compute between comm points as Inductor "
                    "regions (load_plan(..., inductor=True)), not ATen ops one by one")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, fp32 (the CPU smoke run)")
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names if m not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; have {', '.join(MODELS)}")
    buckets = parse_buckets(args.buckets) if args.buckets else (TINY_BUCKETS if args.tiny else DEFAULT_BUCKETS)
    shape = TINY_SHAPE if args.tiny else FULL
    dtype = torch.float32 if args.tiny else torch.bfloat16
    dev = torch.device(args.device)
    compile_profile = "h200" if not args.tiny else "cpu"
    for phase, counts in buckets.items():
        for T in counts:
            if phase == "prefill" and T % shape.req_len:
                raise SystemExit(f"--buckets: prefill {T} is not a multiple of the request length {shape.req_len}")
    plans = Path(args.plans) if args.plans else Path(tempfile.mkdtemp(prefix="roofline_plans_"))
    plans.mkdir(parents=True, exist_ok=True)
    cfgs = {n: with_layers((TINY if args.tiny else MODELS)[n], args.layers) for n in names}
    if args.compile_only:
        for n in names:
            for phase, counts in buckets.items():
                for T in counts:
                    ensure_plan(plans, n, cfgs[n], phase, T, dtype, shape, compile_profile)
        print(f"plans in {plans}")
        return []

    from tbo_compiler.load import programs_of
    from tbo_compiler.plan import read_plan

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = _meta(args, dev)
    opts = {"shape": shape, "dtype": dtype, "iters": args.iters, "warmup": args.warmup, "profile": args.profile,
            "trace": args.trace, "out": str(out), "inductor": args.inductor,
            "baseline": dict(kv.split("=", 1) for kv in args.baseline.split(",") if kv)}
    rows: list[dict] = []
    for n in names:
        cfg = cfgs[n]
        paths = {(ph, T): ensure_plan(plans, n, cfg, ph, T, dtype, shape, compile_profile)
                 for ph, counts in buckets.items() for T in counts}
        t0 = time.perf_counter()
        model = random_model(model_dir(plans, n, cfg), 0, 1, dtype, dev, block_size=shape.block)
        print(f"{n}: {cfg['num_hidden_layers']} layers, random weights in {time.perf_counter() - t0:.1f} s", flush=True)
        for (phase, T), p in paths.items():
            try:
                progs = programs_of(read_plan(p), dev)
                row = bench_bucket(n, cfg, model, progs, phase, T, opts, dev)
            except torch.cuda.OutOfMemoryError as e:  # a bucket that does not fit is a result too
                row = {"model": n, "phase": phase, "tokens": T, "error": f"out of memory: {str(e).splitlines()[0]}"}
            progs = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("flops_terms", "bytes_terms", "profile")}),
                  flush=True)
            write_results(out, meta, rows)
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_results(out, meta, rows)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
