"""`flashgen bench accuracy`: what a lower-precision configuration costs in accuracy, on real weights.

Teacher-forced: fixed texts (flashgen's own documentation and source, so the run needs no download) are cut
into windows of WINDOW tokens and scored in one prefill each through the engine's paged path. Every position's
next-token distribution is compared with the same model run in float32 with a float32 KV cache (the oracle, on
the same device): top-1 agreement (argmax equal) and the mean KL(oracle || configuration) in nats. A prefill
reads its own tokens back from the cache, so an FP8 KV cache's rounding is in every score.

    python -m flashgen.bench.accuracy [--model DIR] [--device cuda] [--configs bfloat16,bfloat16+fp8kv+fp8w]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

WINDOW = 512
MAX_WINDOWS = 8
CONFIGS = ("bfloat16", "bfloat16+fp8kv", "bfloat16+int8kkv")  # dtype[+fp8kv|+int8kkv][+fp8w]; float32 runs first


def corpus_ids(tokenizer, windows: int = MAX_WINDOWS, window: int = WINDOW) -> list[list[int]]:
    """Token windows of flashgen's own texts: documentation (English prose) and source (code), interleaved."""
    root = Path(__file__).resolve().parents[1]
    texts = [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))[:40]]
    docs = sorted((root.parent / "docs").glob("*.md")) + [root.parent / "README.md"]
    texts = [p.read_text(encoding="utf-8") for p in docs if p.is_file()] + texts
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t)
        if len(ids) >= windows * window:
            break
    return [ids[i:i + window] for i in range(0, min(len(ids), windows * window) - window + 1, window)]


def _engine(model: str, device: str, name: str):
    from flashgen.config import EngineConfig
    from flashgen.llm import LLM

    dtype, *extras = name.split("+")
    unknown = set(extras) - {"fp8kv", "int8kkv", "fp8w"}
    if unknown or {"fp8kv", "int8kkv"} <= set(extras):
        raise ValueError(f"configuration {name!r}: use dtype[+fp8kv|+int8kkv][+fp8w]")
    kv = "fp8" if "fp8kv" in extras else "int8k" if "int8kkv" in extras else "auto"
    cfg = EngineConfig(model=model, device=device, dtype=dtype, kv_cache_dtype=kv,
                       kv_cache_gb=0.5, max_num_seqs=1, max_num_batched_tokens=max(WINDOW, 64),
                       max_model_len=WINDOW, enforce_eager=True, quantization="fp8" if "fp8w" in extras else "auto")
    return LLM(config=cfg)


def run(model: str, device: str, configs: tuple[str, ...] = CONFIGS) -> dict:
    from flashgen.llm import resolve_model_name

    model = resolve_model_name(model or None)
    oracle = _engine(model, device, "float32")
    windows = corpus_ids(oracle.tokenizer)
    ref = [oracle.engine.runner.prompt_logits(w).log_softmax(-1).cpu() for w in windows]
    del oracle
    scores: dict[str, dict] = {}
    results = {"model": model, "device": device, "windows": len(windows), "tokens": sum(map(len, windows)),
               "configs": scores}
    for name in configs:
        t0 = time.perf_counter()
        llm = _engine(model, device, name)
        agree = kl = n = 0.0
        for w, lp_ref in zip(windows, ref, strict=True):
            lp = llm.engine.runner.prompt_logits(w).log_softmax(-1).cpu()
            agree += float((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
            kl += float((lp_ref.exp() * (lp_ref - lp)).sum())
            n += len(w)
        r = llm.engine.runner
        scores[name] = {"top1_agreement": agree / n, "kl_nats": kl / n, "kv_dtype": str(r.kv_dtype),
                                    "kv_scales": r.model.kv_scales_from, "seconds": time.perf_counter() - t0}
        del llm
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="model directory or name (default: the embedded model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated dtype[+fp8kv|+int8kkv][+fp8w] (fp8kv / int8kkv: --kv-cache-dtype fp8 / "
                         "int8k; fp8w: FP8 weights, --quantization fp8)")
    ap.add_argument("--out-dir", default=None, help="write accuracy.json here")
    ap.add_argument("--headroom", type=float, default=None,
                    help="the FP8 calibration's headroom (default: engine.kv_plan.CALIBRATION_HEADROOM)")
    a = ap.parse_args(argv)
    if a.headroom is not None:
        from flashgen.engine import kv_plan

        kv_plan.CALIBRATION_HEADROOM = a.headroom
    res = run(a.model, a.device, tuple(c for c in a.configs.split(",") if c))
    print(f"accuracy vs float32 on {res['device']}: {res['windows']} windows, {res['tokens']:,} tokens "
          f"(teacher-forced, {Path(res['model']).name})")
    print(f"{'config':<20} {'top-1 agree':>12} {'KL (nats)':>12}  KV")
    for name, c in res["configs"].items():
        print(f"{name:<20} {100 * c['top1_agreement']:>11.2f}% {c['kl_nats']:>12.5f}  {c['kv_dtype']}"
              f" (scales: {c['kv_scales']})")
    if a.out_dir:
        Path(a.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(a.out_dir) / "accuracy.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
