"""The tokenizer's cost a line on a job's prompts, with flashgen.tokenizer.PieceCache (a recurring piece, such as the
shared system message, tokenized once) and without it (every prompt tokenized whole), alternated: the process's CPU
time (the tokenizer's own threads included) and the wall time a line, in groups of the job's PREPARE_GROUP, and
whether both give the same ids. CPU only, no GPU needed.

    PYTHONPATH=. python3 tools/probes/tokenize_probe.py TOKENIZER_DIR [--workload extract] [--lines 2000]
        [--rounds 3]

`--patterns` times, instead, how PieceCache finds the added tokens in a text when there are thousands of them
(Gemma's tokenizer has ~6,000: reserved tokens and whitespace runs): one alternation, longest first, against the
trie-shaped pattern it uses (flashgen.tokenizer.added_token_pattern), on a ~5 KB chat prompt; both must find the
same tokens.

    PYTHONPATH=. python3 tools/probes/tokenize_probe.py --patterns
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flashgen.bench.jobs import WORKLOADS, _model_dir, make_texts
from flashgen.jobs.runner import PREPARE_GROUP
from flashgen.tokenizer import PieceCache, Tokenizer


def patterns(reps: int = 50) -> None:
    import re

    from flashgen.tokenizer import added_token_pattern

    tokens = ([f"<unused{i}>" for i in range(6000)] + ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"]
              + [" " * k for k in range(2, 32)] + ["\n" * k for k in range(1, 32)])
    text = ("<start_of_turn>user\n" + "The quick brown fox jumps over the lazy dog.  Two  spaces.\n\n" * 80
            + "<end_of_turn>\n<start_of_turn>model\n")
    found = {}
    for name, pattern in (("alternation", "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))),
                          ("trie", added_token_pattern(tokens))):
        t0 = time.perf_counter()
        rx = re.compile(pattern)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(reps):
            found[name] = [m.span() for m in rx.finditer(text)]
        scan = (time.perf_counter() - t0) / reps
        print(f"{name:<12} {len(tokens):,} added tokens: compiled in {1e3 * built:.1f} ms; a {len(text):,}-character "
              f"prompt scanned in {1e6 * scan:,.0f} us ({len(found[name])} tokens found)")
    print(f"same tokens found: {found['alternation'] == found['trie']}")


def main() -> None:
    if sys.argv[1:] == ["--patterns"]:
        patterns()
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer")
    ap.add_argument("--workload", default="extract", choices=tuple(WORKLOADS))
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    w = WORKLOADS[a.workload]
    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer(_model_dir(str(Path(d) / "model"), Path(a.tokenizer), "tiny"))
        instruction, texts, _ = make_texts(w, a.lines, lambda s: tok.encode(s, add_special_tokens=False),
                                           lambda ts: [len(i) for i in tok.encode_batch(ts, add_special_tokens=False)])
        prompts = [tok.apply_chat_template(([{"role": "system", "content": instruction}] if instruction else [])
                                           + [{"role": "user", "content": t}]) for t in texts]
        cache = tok._pieces
        runs: dict[str, list[tuple[float, float]]] = {"whole": [], "pieces": []}
        ids: dict[str, list[list[int]]] = {}
        for r in range(2 * a.rounds):
            mode = "pieces" if r % 2 else "whole"
            # whole: the library's encode_batch as before the cache; pieces: a cold cache each round, as a job starts
            tok._pieces = PieceCache(cache._split) if mode == "pieces" and cache is not None else None
            cpu, wall = time.process_time(), time.perf_counter()
            out = []
            for g in range(0, len(prompts), PREPARE_GROUP):
                out += tok.encode_batch(prompts[g:g + PREPARE_GROUP], add_special_tokens=False)
            runs[mode].append((1e3 * (time.process_time() - cpu) / len(prompts),
                               1e3 * (time.perf_counter() - wall) / len(prompts)))
            ids[mode] = out
        tokens = statistics.fmean(len(i) for i in ids["whole"])
        print(f"{a.workload}: {len(prompts)} prompts of {tokens:.0f} tokens on average; piece cache "
              f"{'on' if cache is not None else 'not taken by this tokenizer'}; same ids: "
              f"{ids['whole'] == ids['pieces']}")
        print(f"{'mode':<8}{'CPU ms a line (median)':>24}{'wall ms a line':>16}   rounds (CPU)")
        for mode, rs in runs.items():
            print(f"{mode:<8}{statistics.median(c for c, _ in rs):>24.3f}{statistics.median(x for _, x in rs):>16.3f}"
                  f"   {', '.join(f'{c:.3f}' for c, _ in rs)}")


if __name__ == "__main__":
    main()
