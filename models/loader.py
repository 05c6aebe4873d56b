"""Load a Hugging Face checkpoint directory into one of the models.

Contract: reads config.json (a wrapper's `text_config` for Kimi K2.5) and the safetensors files
(`model.safetensors`, or shards listed by `model.safetensors.index.json`); reads only the tensors
the model's parameters need (so the MTP layer, vision tower, ... are never touched; of a tensor
that holds every expert, only this rank's rows); dequantizes fp8-block, int4 pack-quantized and
MXFP4 weights to `dtype`. Every failure is one `ModelLoadError` line naming the file and the
tensor or config field.

Pseudo-code:
  1. read config.json -> architecture, config dataclass, name prefix, quantization
  2. build the model on the meta device, materialise it on `device`
  3. for each parameter: checkpoint name(s) from the model's CHECKPOINT_NAMES templates ->
     read -> dequantize -> check shape -> copy (stacked expert parameters: this rank's experts,
     from one tensor per expert or from one tensor of all experts: moe.FusedExperts; several
     tensors concatenated along dim 0: a tuple in equal parts, an attention.RowParts in parts of
     the sizes it gives, each part read and checked at its own logical shape)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from tbo_compiler.models import quant
from tbo_compiler.models.attention import RowParts
from tbo_compiler.models.deepseek_v3 import DeepseekV3Config, DeepseekV3Model
from tbo_compiler.models.gpt_oss import GptOssConfig, GptOssModel
from tbo_compiler.models.mixtral import MixtralConfig, MixtralModel
from tbo_compiler.models.moe import FusedExperts, MoEBlock, ParallelConfig
from tbo_compiler.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeModel
from tbo_compiler.ops.errors import ModelLoadError, RuntimeFailure, one_line

log = logging.getLogger(__name__)

#: model_type -> (config class, model class)
ARCHITECTURES = {
    "deepseek_v3": (DeepseekV3Config, DeepseekV3Model),
    "deepseek_v2": (DeepseekV3Config, DeepseekV3Model),
    "kimi_k2": (DeepseekV3Config, DeepseekV3Model),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeModel),
    "gpt_oss": (GptOssConfig, GptOssModel),
    "mixtral": (MixtralConfig, MixtralModel),
}
#: multimodal wrappers: model_type -> prefix of the language model's tensor names
WRAPPERS = {"kimi_k25": "language_model."}
SUPPORTED = sorted([*ARCHITECTURES, *WRAPPERS])


# Step 1: config --------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON ({one_line(e)})") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


#: a config field's annotation -> (test, what the value must be). The config dataclasses' annotations
#: are the table of which field has which kind; `X | None` also allows null.
_KINDS = {
    "int": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "float": (lambda v: type(v) in (int, float) and math.isfinite(v), "a number"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "str": (lambda v: type(v) is str, "a string"),
    "list": (lambda v: type(v) is list, "a list"),
    "dict": (lambda v: type(v) is dict, "a JSON object"),
}
#: integer fields where 0 means "none" (no shared experts, no dense prefix, no q LoRA, no window)
_ZERO_OK = {"n_shared_experts", "first_k_dense_replace", "q_lora_rank", "sliding_window"}


def _check_fields(path: Path, cfg_cls: type, text: dict) -> None:
    for f in dataclasses.fields(cfg_cls):
        if f.name not in text:
            continue
        v, (kind, _, none) = text[f.name], str(f.type).partition(" | ")
        if kind not in _KINDS:  # a kind the table does not know is left to the dataclass
            continue
        test, what = _KINDS[kind]
        if (v is None and none) or test(v) or (f.name in _ZERO_OK and type(v) is int and v == 0):
            continue
        raise ModelLoadError(f"{path}: field {f.name!r} must be {what}{' or null' if none else ''}, got {v!r}")


def resolve_model(model_dir) -> tuple[object, type, str]:
    """-> (config dataclass, model class, tensor name prefix)."""
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"{model_dir}: no such model directory (expected config.json and *.safetensors)")
    path = Path(model_dir) / "config.json"
    raw = _read_json(path)
    prefix, text = "", raw
    mt = raw.get("model_type")
    if isinstance(mt, str) and mt in WRAPPERS:
        prefix, text = WRAPPERS[mt], raw.get("text_config")
        if not isinstance(text, dict):
            raise ModelLoadError(f"{path}: missing config field 'text_config' (model_type {mt})")
        mt = text.get("model_type")
        if "quantization_config" not in text and "quantization_config" in raw:
            text = {**text, "quantization_config": raw["quantization_config"]}
    if not isinstance(mt, str) or mt not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: unknown model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
    cfg_cls, model_cls = ARCHITECTURES[mt]
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in text:
            raise ModelLoadError(f"{path}: missing config field {name!r} (model_type {mt})")
    _check_fields(path, cfg_cls, text)
    try:
        cfg = cfg_cls(**{k: v for k, v in text.items() if k in fields})
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{path}: bad config: {one_line(e)}") from None
    why = _config_problem(cfg)
    if why:
        raise ModelLoadError(f"{path}: bad config: {why}")
    return cfg, model_cls, prefix


_EXPERT_COUNTS = ("n_routed_experts", "num_experts", "num_local_experts")


def _config_problem(cfg) -> str | None:
    """Values every architecture needs in range, checked before any work (the field names are the
    config's own): a positive norm epsilon, a top-k within the experts, a valid fp8 block."""
    eps = getattr(cfg, "rms_norm_eps", None)
    if isinstance(eps, (int, float)) and not eps > 0:
        return f"rms_norm_eps must be a positive number, got {eps!r}"
    k = getattr(cfg, "num_experts_per_tok", None)
    name = next((f for f in _EXPERT_COUNTS if isinstance(getattr(cfg, f, None), int)), None)
    n = getattr(cfg, name) if name else None
    if isinstance(k, int) and n and not 0 < k <= n:
        return f"num_experts_per_tok {k} must be in 1..{name} ({n})"
    q = getattr(cfg, "quantization_config", None) or {}
    if isinstance(q, dict) and "weight_block_size" in q and q["weight_block_size"] is not None:
        b = q["weight_block_size"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in b)):
            return f"quantization_config.weight_block_size must be two positive integers like [128, 128], got {b!r}"
    return None


def read_config(model_dir):
    """The architecture's config dataclass (DeepseekV3Config, Qwen3MoeConfig, ...) for `model_dir`."""
    return resolve_model(model_dir)[0]


# Step 3 helpers: the tensor store ---------------------------------------------------------------

class _Checkpoint:
    """name -> file from the index (or the single file); files opened lazily with safe_open."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self._open, self.dir, self._handles = safe_open, model_dir, {}
        index, single = model_dir / "model.safetensors.index.json", model_dir / "model.safetensors"
        if index.exists():
            self.where = index
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise ModelLoadError(f"{index}: missing field 'weight_map'")
            self.weight_map = wm
        elif single.exists():
            self.where = single
            self.weight_map = dict.fromkeys(self._handle("model.safetensors", None).keys(), "model.safetensors")
        else:
            raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, file: str, name: str | None):
        if file not in self._handles:
            path = self.dir / file
            if not path.exists():
                raise ModelLoadError(f"{self.where}: shard file {file} (holding tensor {name}) not found")
            try:
                self._handles[file] = self._open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise ModelLoadError(f"{path}: unreadable safetensors ({one_line(e)})") from None
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise ModelLoadError(f"{self.where}: missing tensor {name}")
        try:
            return self._handle(file, name).get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:  # e.g. an index that lists a tensor its shard does not hold
            raise ModelLoadError(f"{self.dir / file}: cannot read tensor {name} ({one_line(e)})") from None

    def _slice(self, name: str):
        file = self.weight_map.get(name)
        if file is None:
            raise ModelLoadError(f"{self.where}: missing tensor {name}")
        try:
            return self._handle(file, name).get_slice(name)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{self.dir / file}: cannot read tensor {name} ({one_line(e)})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def get_rows(self, name: str, lo: int, n: int) -> torch.Tensor:
        """Rows lo..lo+n of dim 0 (this rank's experts), without reading the rest."""
        try:
            return self._slice(name)[lo:lo + n]
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{self.file_of(name)}: cannot read tensor {name} ({one_line(e)})") from None

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map.get(name, self.where.name)


def _check(ckpt: _Checkpoint, name: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise ModelLoadError(f"{ckpt.file_of(name)}: tensor {name} has shape {list(got)}, expected {list(want)}")


def _check_dtype(ckpt: _Checkpoint, name: str, t: torch.Tensor, want: torch.dtype | None, what: str) -> None:
    """`want` None: any floating-point dtype (a plain or fp8 weight, a scale)."""
    if (not t.is_floating_point()) if want is None else t.dtype != want:
        raise ModelLoadError(f"{ckpt.file_of(name)}: tensor {name} is {str(t.dtype).removeprefix('torch.')}, "
                             f"expected {what}")


def _read_weight(ckpt: _Checkpoint, name: str, shape: tuple, qcfg: dict) -> torch.Tensor:
    """The tensor `name` of `shape` in fp32, dequantized if stored quantized."""
    base = name.removesuffix(".weight")
    if not ckpt.has(name) and ckpt.has(base + ".weight_packed"):
        gs = qcfg["int4_group_size"]
        wshape = ckpt.get(base + ".weight_shape").tolist()
        _check(ckpt, base + ".weight_shape", wshape, shape)
        packed, scale = ckpt.get(base + ".weight_packed"), ckpt.get(base + ".weight_scale")
        _check_dtype(ckpt, base + ".weight_packed", packed, torch.int32, "int32 (packed int4)")
        _check_dtype(ckpt, base + ".weight_scale", scale, None, "a floating-point scale")
        _check(ckpt, base + ".weight_packed", packed.shape, (shape[0], -(-shape[1] // 8)))
        _check(ckpt, base + ".weight_scale", scale.shape, (shape[0], -(-shape[1] // gs)))
        return quant.dequantize_int4_group(packed, scale, wshape, gs)
    t = ckpt.get(name)
    _check(ckpt, name, t.shape, shape)
    _check_dtype(ckpt, name, t, None, "a floating-point weight")
    if ckpt.has(name + "_scale_inv"):
        block = qcfg["fp8_block"]
        s = ckpt.get(name + "_scale_inv")
        _check_dtype(ckpt, name + "_scale_inv", s, None, "a floating-point scale")
        _check(ckpt, name + "_scale_inv", s.shape, quant.fp8_scale_shape(shape, block))
        return quant.dequantize_fp8_block(t, s, block)
    if t.element_size() == 1:  # fp8 without its block scales would load as raw quantized values
        raise ModelLoadError(f"{ckpt.file_of(name)}: tensor {name} is {str(t.dtype).removeprefix('torch.')} "
                             f"but {name}_scale_inv is missing")
    return t.float()


def _read_fused_experts(ckpt: _Checkpoint, name: str, spec: FusedExperts, num_experts: int, lo: int,
                        shape: tuple) -> torch.Tensor:
    """Experts lo..lo+n of the all-experts tensor `name` as fp32 [n, ...] = `shape`."""
    n, rest = shape[0], tuple(shape[1:])
    if not spec.mxfp4:
        _check(ckpt, name, ckpt.shape(name), (num_experts, *rest))
        w = ckpt.get_rows(name, lo, n)
        _check_dtype(ckpt, name, w, None, "a floating-point weight")
        return w.float()
    blocks, scales = name + "_blocks", name + "_scales"
    if not ckpt.has(blocks) and ckpt.has(name):
        raise ModelLoadError(f"{ckpt.file_of(name)}: tensor {name} is not MXFP4 ({blocks} + {scales}); "
                             "only MXFP4 expert weights are supported")
    if rest[-1] % quant.MXFP4_BLOCK:
        raise ModelLoadError(f"{ckpt.file_of(blocks)}: tensor {blocks}: MXFP4 rows of {rest[-1]} values are not "
                             f"whole blocks of {quant.MXFP4_BLOCK}")
    groups = rest[-1] // quant.MXFP4_BLOCK
    _check(ckpt, blocks, ckpt.shape(blocks), (num_experts, *rest[:-1], groups, quant.MXFP4_BLOCK // 2))
    _check(ckpt, scales, ckpt.shape(scales), (num_experts, *rest[:-1], groups))
    b, s = ckpt.get_rows(blocks, lo, n), ckpt.get_rows(scales, lo, n)
    for t, tname in ((b, blocks), (s, scales)):
        _check_dtype(ckpt, tname, t, torch.uint8, "uint8 (MXFP4)")
    return quant.dequantize_mxfp4(b, s)


def _quant_settings(cfg) -> dict:
    q = getattr(cfg, "quantization_config", None) or {}
    block = tuple(q.get("weight_block_size") or (128, 128))
    gs = 32
    for group in (q.get("config_groups") or {}).values():
        gs = (group.get("weights") or {}).get("group_size") or gs
    return {"fp8_block": block, "int4_group_size": gs}


def _template_regex(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace(r"\{\}", r"(\d+)") + "$")


# Step 3: parameters ---------------------------------------------------------------------------

@torch.no_grad()
def _load_params(model: nn.Module, ckpt: _Checkpoint, prefix: str, qcfg: dict) -> None:
    templates = [(_template_regex(k), v if isinstance(v, (tuple, FusedExperts, RowParts)) else (v,))
                 for k, v in model.checkpoint_names.items()]
    for pname, param in model.named_parameters():
        match = next(((m, v) for r, v in templates if (m := r.match(pname))), None)
        if match is None:  # a model/template mismatch, not a checkpoint problem
            raise RuntimeFailure(f"parameter {pname} has no checkpoint name template")
        m, sources = match
        idx = [int(g) for g in m.groups()]
        if isinstance(sources, FusedExperts):  # [E_loc, ...]: this rank's rows of the all-experts tensor
            moe = model.get_submodule(pname.rsplit(".", 2)[0])
            w = _read_fused_experts(ckpt, prefix + sources.template.format(*idx), sources, moe.num_experts,
                                    moe.par.ep_rank * moe.e_loc, tuple(param.shape))
            if sources.deinterleave:  # gate/up alternate along dim 1 on disk: -> [gate; up]
                w = torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)
            param.copy_(w.to(param.dtype))
            continue
        # concatenated parts along dim 0: equal ones (a tuple) or of the model's sizes (a RowParts)
        tmpls = sources.templates if isinstance(sources, RowParts) else sources
        stacked = tmpls[0].count("{}") > len(idx)
        if stacked:  # [E_loc, rows, cols]: this rank's experts, ids offset by rank
            moe = model.get_submodule(pname.rsplit(".", 2)[0])
            experts = [(j, moe.par.ep_rank * moe.e_loc + j) for j in range(param.shape[0])]
        else:
            experts = [(None, None)]
        total = param.shape[1 if stacked else 0]
        rows = tuple(sources.rows(model.config)) if isinstance(sources, RowParts) else \
            (total // len(tmpls),) * len(tmpls)
        if len(rows) != len(tmpls) or sum(rows) != total:  # a model/template mismatch, as above
            raise RuntimeFailure(f"parameter {pname} has {total} rows, its checkpoint parts "
                                 f"{list(tmpls)} have {list(rows)}")
        for j, e in experts:
            dst = param[j] if stacked else param
            lo = 0
            for tmpl, n in zip(tmpls, rows):
                name = prefix + tmpl.format(*idx, *([e] if stacked else []))
                w = _read_weight(ckpt, name, (n, *dst.shape[1:]), qcfg)  # each part's own logical shape
                dst[lo:lo + n].copy_(w.to(param.dtype))
                lo += n


def build_model(model_dir, *, parallel: ParallelConfig | None = None, block_size: int = 16,
                dtype=torch.float32, num_layers: int | None = None, device="meta") -> nn.Module:
    """The model `model_dir`/config.json describes, with no weights read: on the meta device
    (shapes only: what tracing needs) or materialised uninitialised on `device`."""
    cfg, model_cls, _ = resolve_model(model_dir)
    if num_layers is not None:
        if type(num_layers) is not int or not 0 < num_layers <= cfg.num_hidden_layers:
            raise ModelLoadError(f"{Path(model_dir) / 'config.json'}: num_layers must be 1..{cfg.num_hidden_layers} "
                                 f"(the model's num_hidden_layers), got {num_layers!r}")
        cfg.num_hidden_layers = num_layers
    try:
        with torch.device("meta"):
            model = model_cls(cfg, parallel or ParallelConfig(), block_size=block_size, dtype=dtype)
    except ValueError as e:  # the config and the parallel setup disagree (e.g. experts over ranks)
        raise ModelLoadError(f"{Path(model_dir) / 'config.json'}: {one_line(e)}") from None
    if str(device) != "meta":
        model.to_empty(device=device)
        model.init_buffers()
        for m in model.modules():  # per-rank buffers of the MoE blocks
            if isinstance(m, MoEBlock):
                m.init_buffers()
    return model.eval().requires_grad_(False)


def load_model(model_dir, *, dtype=torch.float32, device="cpu", parallel: ParallelConfig | None = None,
               block_size: int = 16, num_layers: int | None = None) -> nn.Module:
    """Build the model described by `model_dir`/config.json and load its weights.

    `parallel` selects this rank's experts (expert parallelism); `num_layers` keeps only the
    first layers (tests, benchmarks)."""
    model_dir = Path(model_dir)
    model = build_model(model_dir, parallel=parallel, block_size=block_size, dtype=dtype,
                        num_layers=num_layers, device=device)
    cfg, _, prefix = resolve_model(model_dir)
    _load_params(model, _Checkpoint(model_dir), prefix, _quant_settings(cfg))
    log.info("loaded %s (%d layers) from %s", cfg.model_type, model.config.num_hidden_layers, model_dir)
    # inference only: without grads, compile/export need no autograd formulas for the tbo ops
    return model
