"""Read a HF checkpoint's safetensors straight onto the target device, fusing q/k/v and gate/up.

FP8 checkpoints (config.json's quantization_config, see flashgen.models.quant): a projection weight stored as
F8_E4M3 is kept in float8 with its `weight_scale` as a float32 scale per output row; the fused q/k/v and gate/up
weights get one scale vector over their rows. Weights can also be quantized at load (quantize_fp8_layer).

Every file is checked before a weight is read (an empty, truncated or garbage safetensors file, a broken index, a
missing shard), every tensor against the dtype and shape config.json implies, and every loaded weight for NaN and
inf: each problem stops the load with a ModelLoadError naming the file, the tensor, what is wrong and the fix.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from flashgen.models.errors import ModelFileMissing, ModelLoadError, json_kind, read_json
from flashgen.models.layouts import gate_up_parts, is_moe_layer, projection_shapes, qkv_parts
from flashgen.models.moe import stack_experts
from flashgen.models.spec import ModelSpec
from flashgen.ops.torch_ops import quantize_fp8_rows

REDOWNLOAD = "download the checkpoint again"
INDEX = "model.safetensors.index.json"
# safetensors dtype codes -> bytes per element; the weights must be one of the float ones (ST_FLOATS: their names)
_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
ST_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_HEADER = 100_000_000  # safetensors' own limit
FP8_ST = "F8_E4M3"  # the FP8 weights flashgen runs (e4m3fn, max 448)
FP8 = torch.float8_e4m3fn
# the linear layers whose weights may be FP8 (each decoder layer's projections); embeddings, norms and lm_head
# stay in the model dtype (an FP8 lm_head in a checkpoint is dequantized at load)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "self_attn.qkv_proj", "mlp.gate_up_proj")  # the last two: Phi-3's
FUSED_FP8 = ("qkv", "o", "gate_up", "down")  # the layer weights that run FP8 (each with a "<name>_scale")


def read_header(path: Path) -> dict[str, dict]:
    """{tensor name: {dtype, shape, data_offsets}} of a safetensors file, checked against the file's size, so an
    empty, truncated or foreign file is refused with what is wrong before any weight is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw = f.read(n) if len(head) == 8 and 0 < n <= min(_MAX_HEADER, size - 8) else b""
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror or e}); check the file's permissions") from None
    if size == 0:
        raise ModelLoadError(f"{path}: empty (0 bytes); {REDOWNLOAD}")
    if head.startswith(b"version "):
        raise ModelLoadError(f"{path}: a Git LFS pointer, not the weights; fetch the real file (git lfs pull) or "
                             f"{REDOWNLOAD}")
    if len(head) < 8:
        raise ModelLoadError(f"{path}: truncated ({size} bytes, less than a safetensors header); {REDOWNLOAD}")
    if n == 0 or n > _MAX_HEADER:
        raise ModelLoadError(f"{path}: not a safetensors file (its first 8 bytes give a header of {n:,} bytes); "
                             f"{REDOWNLOAD}")
    if n > size - 8:
        raise ModelLoadError(f"{path}: truncated (its header alone is {n:,} bytes, the file has {size:,}); "
                             f"{REDOWNLOAD}")
    garbage = f"{path}: the safetensors header is garbage"
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{garbage} (not JSON: {e}); {REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{garbage} (a JSON {json_kind(header)}, not an object); {REDOWNLOAD}")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list) and all(_nonneg_int(d) for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(_nonneg_int(o) for o in info["data_offsets"])
              and info["data_offsets"][0] <= info["data_offsets"][1])
        if not ok:
            raise ModelLoadError(f"{garbage} (tensor {name!r} has the entry {_short(info)}, not "
                                 f"{{dtype, shape, data_offsets}}); {REDOWNLOAD}")
        begin, stop = info["data_offsets"]
        width = _ST_BYTES.get(info["dtype"])
        if width is not None and (stop - begin) != math.prod(info["shape"]) * width:
            raise ModelLoadError(f"{garbage} (tensor {name!r}: shape {info['shape']} in {info['dtype']} needs "
                                 f"{math.prod(info['shape']) * width:,} bytes, its offsets give {stop - begin:,}); "
                                 f"{REDOWNLOAD}")
        end = max(end, stop)
    data = size - 8 - n
    if data < end:
        raise ModelLoadError(f"{path}: truncated (the header says {end:,} bytes of tensors, the file has {data:,}); "
                             f"{REDOWNLOAD}")
    if data > end:
        raise ModelLoadError(f"{path}: {data - end:,} bytes longer than its header says (the header says {end:,} "
                             f"bytes of tensors, the file has {data:,}); {REDOWNLOAD}")
    return header


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def index_checkpoint(model_dir: Path) -> tuple[dict[str, Path], dict[Path, dict[str, dict]], Path]:
    """(tensor name -> file holding it, file -> its header, the file to name when a tensor is missing), for one
    file or a sharded checkpoint. Every header is read and checked first: a broken shard stops the load before
    any weight is read (and `flashgen info` sizes a checkpoint from these headers alone)."""
    idx = model_dir / INDEX
    if idx.is_file():
        doc = read_json(idx, REDOWNLOAD)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{idx}: has no 'weight_map' object of tensor name -> file name; {REDOWNLOAD}")
        files = {name: model_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise ModelFileMissing(f"{f}: listed in {idx.name} but not found; {REDOWNLOAD} (all of its shards)")
        return files, {f: read_header(f) for f in sorted(set(files.values()))}, idx
    single = model_dir / "model.safetensors"
    shards = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise ModelFileMissing(f"{model_dir}: no model.safetensors or {INDEX} found; give a HuggingFace "
                               "checkpoint directory with safetensors weights")
    headers = {f: read_header(f) for f in shards}
    files = {}
    for f, header in headers.items():
        files.update({k: f for k in header})
    return files, headers, shards[0] if len(shards) == 1 else model_dir


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, as config.json implies them: what load_weights checks, dummy_weights makes and a
    GGUF conversion must write."""
    h, d = spec.hidden_size, spec.head_dim
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            **projection_shapes(spec, i),  # per family: fused or separate q/k/v and gate/up, or experts
        })
        if spec.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (spec.q_size,), p + "self_attn.k_proj.bias": (spec.kv_size,),
                           p + "self_attn.v_proj.bias": (spec.kv_size,)})
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if spec.sandwich_norm:  # Gemma 3
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
    return shapes


KV_SCALE_NAMES = (("self_attn.k_scale", "self_attn.v_scale"),            # compressed-tensors, vLLM, ModelOpt
                  ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),  # older FP8 exports
                  ("self_attn.kv_scale", "self_attn.kv_scale"))          # one scale for both (older vLLM)


def load_kv_scales(model_dir: str | Path, spec: ModelSpec) -> tuple[list[float], list[float]] | None:
    """The checkpoint's per-layer FP8 KV-cache scales (K, V), or None when it has none. Scalars (or one-element
    tensors) named as in KV_SCALE_NAMES for every layer; a checkpoint that has them for some layers only, or a
    scale that is not a positive finite number, is refused."""
    files, headers, where = index_checkpoint(Path(model_dir))
    for k_name, v_name in KV_SCALE_NAMES:
        first = f"model.layers.0.{k_name}"
        if first not in files:
            continue
        out: tuple[list[float], list[float]] = ([], [])
        for i in range(spec.num_layers):
            for j, name in enumerate((k_name, v_name)):
                full = f"model.layers.{i}.{name}"
                if full not in files:
                    raise ModelLoadError(f"{where}: {first!r} is there but {full!r} is missing; the checkpoint's "
                                         f"KV-cache scales must cover every layer: {REDOWNLOAD}")
                with safe_open(files[full], framework="pt", device="cpu") as h:
                    t = h.get_tensor(full).float()
                if t.numel() != 1 or not bool(torch.isfinite(t).all()) or float(t) <= 0:
                    raise ModelLoadError(f"{files[full]}: {full!r} must be one positive finite number, not "
                                         f"{t.flatten()[:4].tolist()}; {REDOWNLOAD}")
                out[j].append(float(t))
        return out
    return None


def load_weights(model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """All weights by HF name, on `device` in `dtype`, each checked against `expected_shapes` (from the headers,
    before anything is read) and for NaN / inf (after, on `device`, with one host sync for all of them)."""
    model_dir = Path(model_dir)
    files, headers, where = index_checkpoint(model_dir)
    want = expected_shapes(spec)
    missing = [k for k in want if k not in files]
    if missing:
        raise ModelLoadError(
            f"{where}: tensor {missing[0]!r} is missing"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the checkpoint does not match "
            f"config.json ({spec.architecture}, {spec.num_layers} layer{'s' * (spec.num_layers != 1)}): {REDOWNLOAD} "
            "or fix config.json"
        )
    by_file: dict[Path, list[str]] = {}
    fp8: dict[str, str] = {}  # an F8_E4M3 weight's name -> its weight_scale's name
    for name in want:
        f = files[name]
        info = headers[f].get(name)
        if info is None:
            raise ModelLoadError(f"{f}: tensor {name!r} is listed for this file in {INDEX} but the file does not "
                                 f"hold it; {REDOWNLOAD}")
        if info["dtype"] not in ST_FLOATS:
            if info["dtype"] != FP8_ST or spec.quant is None or not name.endswith(".weight"):
                if info["dtype"] == "F8_E5M2" and spec.quant is not None:
                    raise ModelLoadError(f"{f}: tensor {name!r} has dtype F8_E5M2; flashgen runs FP8 weights in "
                                         "e4m3 (F8_E4M3): use the model's unquantized checkpoint")
                raise ModelLoadError(f"{f}: tensor {name!r} has dtype {info['dtype']}; flashgen loads float32, "
                                     f"float16 and bfloat16 weights (quantized checkpoints are not supported): use "
                                     f"the model's unquantized checkpoint")
            fp8[name] = _check_weight_scale(name, want[name][0], files, headers, where)
        found = tuple(info["shape"])
        if found != want[name]:
            raise ModelLoadError(
                f"{f}: tensor {name!r} has shape {list(found)}, expected {list(want[name])} from config.json; "
                f"the weights do not match config.json: {REDOWNLOAD} or fix config.json"
            )
        by_file.setdefault(f, []).append(name)
    scales = {s: name for name, s in fp8.items()}
    for s in scales:
        by_file.setdefault(files[s], []).append(s)
    dev = str(device)
    out: dict[str, torch.Tensor] = {}
    finite: list[torch.Tensor] = []  # one 0-d bool per tensor, left on the device until all are loaded
    for f, names in by_file.items():
        try:
            with safe_open(f, framework="pt", device=dev) as h:
                for name in names:
                    t = h.get_tensor(name)
                    if name in fp8:  # e4m3fn has no inf; NaN is the one pattern S.1111.111
                        finite.append(((t.view(torch.uint8) & 0x7F) != 0x7F).all())
                    elif name in scales:
                        t = t.float().reshape(-1)
                        finite.append((torch.isfinite(t) & (t > 0)).all())
                    else:
                        t = t.to(dtype)
                        finite.append(torch.isfinite(t).all())
                    out[name] = t
        except (SafetensorError, OSError) as e:  # safetensors' own checks (offsets, layout) and read errors
            raise ModelLoadError(f"{f}: cannot be read ({type(e).__name__}: {e}); {REDOWNLOAD}") from None
    if finite:
        ok = torch.stack(finite).cpu()  # the one host sync of the check
        if not bool(ok.all()):
            names = list(out)
            bad = [names[i] for i in (~ok).nonzero().flatten().tolist()]
            if bad[0] in scales:
                raise ModelLoadError(f"{files[bad[0]]}: tensor {bad[0]!r} must hold positive finite scales, not "
                                     f"{out[bad[0]][:4].tolist()}; {REDOWNLOAD}")
            if bad[0] in fp8:
                raise ModelLoadError(f"{files[bad[0]]}: tensor {bad[0]!r} holds NaN values; the weights are "
                                     f"damaged: {REDOWNLOAD}")
            stored = ST_FLOATS[headers[files[bad[0]]][bad[0]]["dtype"]]
            target = str(dtype).replace("torch.", "")
            more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
            cast, fix = "", f"the weights are damaged: {REDOWNLOAD}"
            if target == "float16" and stored in ("float32", "bfloat16"):  # may overflow only in float16's range
                cast = " once cast to float16"
                fix = (f"the weights are damaged or exceed float16's range: load them as {stored} "
                       f"(dtype={stored}) or {REDOWNLOAD}")
            raise ModelLoadError(f"{files[bad[0]]}: tensor {bad[0]!r} holds NaN or infinite values{cast}{more}; {fix}")
    for name, scale_name in fp8.items():  # one float32 scale per output row, (N,)
        n = want[name][0]
        scale = out.pop(scale_name)
        scale = scale.expand(n).contiguous() if scale.numel() == 1 else scale
        if is_projection(name):
            out[scale_name] = scale
        else:  # e.g. an lm_head not in the checkpoint's ignore list: it runs in the model dtype
            out[name] = (out[name].float() * scale[:, None]).to(dtype)
    return out


def is_projection(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(tuple(f".{p}.weight" for p in PROJECTIONS))


def _check_weight_scale(name: str, rows: int, files: dict[str, Path], headers: dict[Path, dict[str, dict]],
                        where: Path) -> str:
    """The name of FP8 weight `name`'s scale, checked in the headers: a float tensor of one scale ([] or [1], per
    tensor) or one per output row ([rows, 1] or [rows], per channel)."""
    scale = name[: -len("weight")] + "weight_scale"
    if scale not in files:
        raise ModelLoadError(f"{where}: tensor {name!r} is FP8 ({FP8_ST}) but its scale {scale!r} is missing; "
                             f"{REDOWNLOAD}")
    info = headers[files[scale]].get(scale)
    if info is None:
        raise ModelLoadError(f"{files[scale]}: tensor {scale!r} is listed for this file in {INDEX} but the file does "
                             f"not hold it; {REDOWNLOAD}")
    if info["dtype"] not in ST_FLOATS:
        raise ModelLoadError(f"{files[scale]}: tensor {scale!r} has dtype {info['dtype']}; an FP8 weight's scale is "
                             f"a float tensor: {REDOWNLOAD}")
    if info["shape"] not in ([], [1], [1, 1], [rows, 1], [rows]):
        raise ModelLoadError(f"{files[scale]}: tensor {scale!r} has shape {info['shape']}; flashgen reads one scale "
                             f"per tensor ([] or [1]) or per output channel ([{rows}, 1]), not group- or block-wise "
                             "scales: use the model's unquantized checkpoint")
    return scale


def dummy_weights(spec: ModelSpec, dtype: torch.dtype, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the right shapes, made on `device` (load_format="dummy", for benchmarks): norms near
    1, matrices N(0, 0.02) as HF initialises them, so activations keep realistic magnitudes."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(spec).items():
        t = torch.empty(shape, dtype=torch.float32 if len(shape) == 1 else dtype, device=device)
        if name.endswith("norm.weight") or "layernorm" in name:
            t.normal_(1.0, 0.05, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        out[name] = t.to(dtype)
    return out


def _fuse(w: dict[str, torch.Tensor], names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused weight from the HF weights `names` (rows stacked), with its per-row FP8 scale (N,) when the parts
    are FP8: per-tensor scales that differ between the parts become a vector. An FP8 part next to a float one
    (a checkpoint that left one of them unquantized) is dequantized, so the fused weight runs in the float dtype."""
    weights = [w.pop(n + ".weight") for n in names]
    scales = [w.pop(n + ".weight_scale", None) for n in names]
    if all(s is None for s in scales):
        return (torch.cat(weights) if len(weights) > 1 else weights[0]), None
    if all(s is not None for s in scales):
        # NOTE: joined as bytes: float8 copies and cats are not implemented on every torch and device
        fused = weights[0] if len(weights) == 1 else torch.cat([t.view(torch.uint8) for t in weights]).view(FP8)
        return fused, torch.cat([s for s in scales if s is not None])
    dtype = next(t.dtype for t, s in zip(weights, scales, strict=True) if s is None)
    return torch.cat([t if s is None else (t.float() * s[:, None]).to(dtype)
                      for t, s in zip(weights, scales, strict=True)]), None


def fuse_layer_weights(w: dict[str, torch.Tensor], spec: ModelSpec, layer: int) -> dict[str, torch.Tensor | None]:
    """One decoder layer's weights in the fused layout the model runs: qkv (q|k|v rows), gate_up (gate|up). FP8
    weights come with `<name>_scale` (N,) float32 (FUSED_FP8), None for float weights. A MoE layer has no gate_up
    and down (None) but router, experts_gate_up and experts_down (flashgen/models/moe.py)."""
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    qkv, qkv_scale = _fuse(w, qkv_parts(spec, layer))
    o, o_scale = _fuse(w, [a + "o_proj"])
    moe = stack_experts(w, spec, layer) if is_moe_layer(spec, layer) else {}
    gate_up, gate_up_scale = _fuse(w, gate_up_parts(spec, layer)) if not moe else (None, None)
    down, down_scale = _fuse(w, [p + "mlp.down_proj"]) if not moe else (None, None)
    fused = {
        "input_norm": norm_weight(w.pop(p + "input_layernorm.weight"), spec),
        "post_norm": norm_weight(w.pop(p + "post_attention_layernorm.weight"), spec),
        "qkv": qkv, "qkv_scale": qkv_scale,
        "qkv_bias": None, "q_norm": None, "k_norm": None,
        "o": o, "o_scale": o_scale,
        "gate_up": gate_up, "gate_up_scale": gate_up_scale,
        "down": down, "down_scale": down_scale,
        **moe,  # a MoE layer's router, experts_gate_up, experts_down (flashgen/models/moe.py)
    }
    if spec.qkv_bias:
        fused["qkv_bias"] = torch.cat([w.pop(a + "q_proj.bias"), w.pop(a + "k_proj.bias"), w.pop(a + "v_proj.bias")])
    if spec.qk_norm:
        fused["q_norm"] = norm_weight(w.pop(a + "q_norm.weight"), spec)
        fused["k_norm"] = norm_weight(w.pop(a + "k_norm.weight"), spec)
    if spec.sandwich_norm:  # Gemma 3: the norms before and after the MLP
        fused["pre_ff_norm"] = norm_weight(w.pop(p + "pre_feedforward_layernorm.weight"), spec)
        fused["post_ff_norm"] = norm_weight(w.pop(p + "post_feedforward_layernorm.weight"), spec)
    return fused


def norm_weight(t: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """An RMSNorm weight as the rms_norm op multiplies it: Gemma's x * (1 + w) stores w, so 1 + w (in float32,
    as HF adds it, then cast to the weight's dtype: exact in float32; one rounding more than HF in bf16 / fp16)."""
    return (1.0 + t.float()).to(t.dtype) if spec.norm_plus_one else t


def quantize_fp8_layer(L: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """A fused layer's float projections quantized to FP8 (--quantization fp8): per output row,
    scale = amax |row| / 448, in float32 (torch_ops.quantize_fp8_rows); weights already FP8 stay as they are."""
    out = dict(L)
    for name in FUSED_FP8:
        w = L[name]
        if w is not None and L[name + "_scale"] is None:
            out[name], out[name + "_scale"] = quantize_fp8_rows(w)
    return out
