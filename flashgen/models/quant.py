"""FP8 weight checkpoints: which `quantization_config` of config.json flashgen runs, checked once with the spec.

Two formats are read, as the Hub publishes them (docs/design.md, "FP8 weights"):

- compressed-tensors (llm-compressor's FP8, FP8_DYNAMIC): `config_groups.*.weights` of `type: "float"`,
  `num_bits: 8`, `strategy: "tensor"` or `"channel"`, symmetric; activations dynamic per token, static per tensor
  (an `input_scale` tensor) or not quantized; modules in `ignore` stay unquantized.
- fbgemm_fp8: per-channel weight scales, dynamic per-token activations (bounded by `activation_scale_ub`),
  modules in `modules_to_not_convert` stay unquantized.

Which tensors are FP8 is then read from the safetensors headers (an F8_E4M3 projection weight with its
`weight_scale`), so the `ignore` lists, regular expressions included, never need interpreting. Activations are
always quantized per token at run time: a checkpoint's static `input_scale` and fbgemm's `activation_scale_ub` are
not used (why: the design document). Anything else is refused here, before a weight is read, naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flashgen.models.errors import ModelLoadError

FIX = "use the model's unquantized (bf16 / fp16) checkpoint; flashgen can quantize it itself with --quantization fp8"
METHODS = ("compressed-tensors", "fbgemm_fp8")
# compressed-tensors' `format` values that store FP8 weights as plain float8 tensors
CT_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(frozen=True)
class FP8Checkpoint:
    """An FP8 checkpoint's scheme, as far as the loader needs it."""
    method: str                  # "compressed-tensors" or "fbgemm_fp8"
    weight_strategy: str         # "tensor" or "channel" (fbgemm_fp8: "channel")
    static_input_scales: bool    # the checkpoint has input_scale tensors (not used: activations are per token)


def _refuse(path: Path, field: str, value, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: quantization_config.{field}={value!r} is not supported ({why}); {FIX}")


def _check_ct_args(path: Path, where: str, args, *, weights: bool) -> str:
    """One `weights` or `input_activations` entry of a compressed-tensors group; returns its strategy."""
    if not isinstance(args, dict):
        raise _refuse(path, where, args, "an object of quantization arguments is expected")
    if args.get("type", "float") != "float":
        raise _refuse(path, f"{where}.type", args.get("type"), "flashgen runs float (FP8) quantization, not int")
    if args.get("num_bits", 8) != 8:
        raise _refuse(path, f"{where}.num_bits", args.get("num_bits"), "flashgen runs 8-bit float (e4m3) only")
    if args.get("symmetric", True) is not True:
        raise _refuse(path, f"{where}.symmetric", args.get("symmetric"), "FP8 scales are symmetric, no zero point")
    strategy = args.get("strategy", "tensor")
    if weights:
        if strategy not in ("tensor", "channel"):
            raise _refuse(path, f"{where}.strategy", strategy,
                          "flashgen runs per-tensor or per-channel weight scales, not group- or block-wise")
        if args.get("dynamic", False):
            raise _refuse(path, f"{where}.dynamic", args.get("dynamic"), "weights must have stored scales")
    else:
        dynamic = args.get("dynamic", False)
        ok = (dynamic is True and strategy == "token") or (dynamic is False and strategy == "tensor")
        if not ok:
            raise _refuse(path, f"{where}.strategy", strategy,
                          f"with dynamic={dynamic!r} flashgen reads dynamic per-token or static per-tensor "
                          "activation scales")
    if args.get("group_size") not in (None, 0) or args.get("block_structure") not in (None, []):
        key = "group_size" if args.get("group_size") not in (None, 0) else "block_structure"
        raise _refuse(path, f"{where}.{key}", args.get(key), "group- and block-wise scales are not supported")
    return str(strategy)


def parse_quantization(cfg: dict, path: Path) -> FP8Checkpoint | None:
    """The FP8 scheme of config.json's `quantization_config`, None when there is none; anything flashgen cannot run
    is a ModelLoadError naming the field, its value and the fix."""
    q = cfg.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ModelLoadError(f"{path}: quantization_config={q!r} must be an object; {FIX}")
    method = q.get("quant_method")
    if method not in METHODS:
        raise _refuse(path, "quant_method", method, f"flashgen runs the FP8 weights of {' and '.join(METHODS)}")
    if method == "fbgemm_fp8":
        ub = q.get("activation_scale_ub")
        if ub is not None and (isinstance(ub, bool) or not isinstance(ub, (int, float)) or not ub > 0):
            raise _refuse(path, "activation_scale_ub", ub, "a positive number is expected")
        return FP8Checkpoint("fbgemm_fp8", "channel", static_input_scales=False)
    fmt = q.get("format")
    if fmt is not None and fmt not in CT_FORMATS:
        raise _refuse(path, "format", fmt, f"flashgen reads FP8 weights stored as {' or '.join(CT_FORMATS)}")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(path, "config_groups", groups, "an object of one or more quantization groups is expected")
    strategies, static = set(), False
    for name, group in groups.items():
        where = f"config_groups.{name}"
        if not isinstance(group, dict):
            raise _refuse(path, where, group, "an object is expected")
        gfmt = group.get("format")
        if gfmt is not None and gfmt not in CT_FORMATS:
            raise _refuse(path, f"{where}.format", gfmt, f"flashgen reads FP8 weights stored as "
                          f"{' or '.join(CT_FORMATS)}")
        if group.get("weights") is None:
            raise _refuse(path, f"{where}.weights", None, "flashgen runs quantized weights, not activations only")
        strategies.add(_check_ct_args(path, f"{where}.weights", group["weights"], weights=True))
        acts = group.get("input_activations")
        if acts is not None:
            static |= _check_ct_args(path, f"{where}.input_activations", acts, weights=False) == "tensor"
        if group.get("output_activations") is not None:
            raise _refuse(path, f"{where}.output_activations", group["output_activations"],
                          "output quantization is not supported")
    return FP8Checkpoint("compressed-tensors", "tensor" if strategies == {"tensor"} else "channel", static)
