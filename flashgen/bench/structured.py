"""The `structured` workload of `flashgen bench throughput`: what a JSON-extraction job costs over the same
requests unconstrained.

2,048 requests on the Qwen3-0.6B shape (random weights) with a real BPE vocabulary (a tokenizer directory,
by default the embedded SmolLM2's; the model's vocabulary is resized to it), each constrained by one 10-field
extraction schema, at most 256 new tokens. The baseline runs the same number of requests with prompts of the
same lengths (other token ids, so no prefix-cache hit favours either run) unconstrained, each generating
exactly the length its constrained twin produced (ignore_eos), so both runs do the same GPU work and the
difference is the grammar's: masks on CPU threads, their copy and the masked sampling. Then the same with a
different schema on every line (every request compiles its own grammar).
"""
from __future__ import annotations

import copy
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from flashgen.bench.throughput import timed_generate

N_REQUESTS = 2048
MAX_TOKENS = 256

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "invoice_id": {"type": "string", "pattern": "^INV-[0-9]{4,8}$"},
        "vendor": {"type": "string", "maxLength": 40},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
        "total": {"type": "number", "minimum": 0},
        "tax_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "paid": {"type": "boolean"},
        "due_days": {"type": "integer", "minimum": 0, "maximum": 365},
        "contact_email": {"type": "string", "maxLength": 40},
        "line_items": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"], "additionalProperties": False}},
    },
    "required": ["invoice_id", "vendor", "date", "currency", "total", "tax_rate", "paid", "due_days",
                 "contact_email", "line_items"],
    "additionalProperties": False,
}


def schema_variant(i: int) -> dict:
    """The schema with line-specific field names and bounds: a distinct grammar per line."""
    s = copy.deepcopy(SCHEMA)
    props = s["properties"]
    props[f"vendor_{i}"] = props.pop("vendor")
    props["due_days"]["maximum"] = 30 + i % 336
    s["required"] = [f"vendor_{i}" if k == "vendor" else k for k in s["required"]]
    return s


def model_dir(path: str, tokenizer_dir: Path, shape: str = "qwen3-0.6b") -> Path:
    """A model directory of `shape` (no weights) with the tokenizer of `tokenizer_dir`, its vocabulary resized to
    the tokenizer's."""
    import json

    from flashgen.bench.synthetic import SHAPES, write_model_dir
    from flashgen.tokenizer import Tokenizer

    d = write_model_dir(shape, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, d / name)
    vocab = Tokenizer(d).vocab_size
    cfg = {**SHAPES[shape], "vocab_size": vocab, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def random_prompts(rng: random.Random, lengths: list[int], vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def main(tokenizer_dir: str | None = None, out_dir: str | None = None, **engine_kw) -> dict:
    from flashgen import LLM, SamplingParams, StructuredOutputsParams

    if not torch.cuda.is_available():
        raise RuntimeError("flashgen bench throughput needs a CUDA GPU")
    if tokenizer_dir is None:
        from flashgen.models.default_model import DEFAULT_MODEL, resolve_model

        tokenizer_dir = resolve_model(DEFAULT_MODEL)
    rng = random.Random(0)
    lengths = [rng.randint(100, 600) for _ in range(N_REQUESTS)]
    res: dict = {"workload": "structured", "device": torch.cuda.get_device_name(), "requests": N_REQUESTS}
    with tempfile.TemporaryDirectory() as d:
        mdir = model_dir(d, Path(tokenizer_dir))
        llm = LLM(model=str(mdir), load_format="dummy", dtype="bfloat16", **engine_kw)
        vocab = llm.engine.spec.vocab_size
        warm = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json={"type": "object"}))
        llm.generate([[1] * 600], warm)
        lines = []
        for case, schemas in (("one schema", [SCHEMA] * N_REQUESTS),
                              ("a schema per line", [schema_variant(i) for i in range(N_REQUESTS)])):
            g = llm.engine.grammars()
            compiles0, compile_s0 = g.compiles, g.compile_seconds
            masks = llm.engine.runner.masks
            assert masks is not None  # made by the warm-up's constrained request
            mask_s0, rows0 = masks.seconds, masks.rows
            sps = [SamplingParams(temperature=0.6, seed=i, max_tokens=MAX_TOKENS,
                                  structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(schemas)]
            t_con, outs = timed_generate(llm, random_prompts(rng, lengths, vocab), sps)
            n_out = [len(o.token_ids) for o in outs]
            stops = sum(o.finish_reason == "stop" for o in outs)
            errors = sum(o.finish_reason == "error" for o in outs)
            mask_s, rows = masks.seconds - mask_s0, masks.rows - rows0
            base = [SamplingParams(temperature=0.6, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(n_out)]
            t_free, outs_free = timed_generate(llm, random_prompts(rng, lengths, vocab), base)
            assert [len(o.token_ids) for o in outs_free] == n_out, "the baseline must produce the same lengths"
            tokens = sum(n_out)
            r = {"constrained_s": t_con, "unconstrained_s": t_free, "output_tokens": tokens,
                 "constrained_tok_per_s": tokens / t_con, "unconstrained_tok_per_s": tokens / t_free,
                 "ratio": t_free / t_con, "finished_stop": stops, "errors": errors,
                 "grammar_compiles": g.compiles - compiles0, "compile_s": g.compile_seconds - compile_s0,
                 "mask_us_per_token": 1e6 * mask_s / max(rows, 1)}
            res[case] = r
            lines.append(
                f"  {case}: constrained {r['constrained_tok_per_s']:,.0f} output tok/s, unconstrained (same lengths)"
                f" {r['unconstrained_tok_per_s']:,.0f} -> {100 * r['ratio']:.0f}%; {stops}/{N_REQUESTS} finished"
                f" by the grammar, {errors} errors; {r['grammar_compiles']} grammar compiles in"
                f" {r['compile_s'] * 1e3:.0f} ms ({1e3 * r['compile_s'] / max(r['grammar_compiles'], 1):.2f} ms"
                f" each); masks {r['mask_us_per_token']:.1f} us per constrained token (host, batched)")
        llm.close()
    print("\n".join([f"workload structured on {res['device']} ({N_REQUESTS} requests, Qwen3-0.6B shape, vocab "
                     f"{vocab}, <= {MAX_TOKENS} new tokens)", *lines]), flush=True)
    if out_dir:
        import json

        with open(f"{out_dir}/throughput_structured.json", "w") as f:
            json.dump(res, f, indent=1)
    return res
