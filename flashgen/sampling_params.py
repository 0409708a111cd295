"""Per-request sampling parameters, with vLLM's names and meanings."""
from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass, field

# Seeds are unsigned 64-bit: [0, 2**64). The sampler keeps them in int64 tensors as the same 64 bits (two's
# complement), so every seed in the range gives its own samples.
SEED_RANGE = (0, 2**64)


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI allows
MAX_N = 128        # samples per request
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's names): exactly one of a JSON schema (`json`, a dict or its JSON
    text), any JSON object (`json_object=True`), a regular expression, a list of choices, or a grammar (Lark,
    as llguidance reads it, or GBNF as llama.cpp writes it)."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(STRUCTURED_KINDS)}; "
                             f"{'none is' if not given else ', '.join(given) + ' are'} set")
        kind = given[0]
        v = getattr(self, kind)
        ok = {"json": isinstance(v, (dict, str)) and bool(v), "regex": isinstance(v, str) and bool(v),
              "grammar": isinstance(v, str) and bool(v.strip()), "json_object": v is True,
              "choice": isinstance(v, (list, tuple)) and bool(v) and all(isinstance(c, str) and c for c in v)}[kind]
        if not ok:
            fix = {"json": "a JSON schema (an object, or its JSON text)", "regex": "a non-empty regular expression",
                   "grammar": "a non-empty Lark or GBNF grammar", "json_object": "true",
                   "choice": "a non-empty list of non-empty strings"}[kind]
            raise ValueError(f"structured_outputs {kind}={_short(v)} is invalid; use {fix}")
        if kind == "choice":
            object.__setattr__(self, "choice", list(v))

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))


def _short(v, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0: greedy
    top_p: float = 1.0                # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = -1                   # -1 or 0: all tokens
    min_p: float = 0.0                # drop tokens with p < min_p * p_max
    max_tokens: int | None = 16       # None: up to the model's context length
    min_tokens: int = 0               # EOS and stop_token_ids are masked until this many tokens exist
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None           # makes this request's samples independent of its batch
    repetition_penalty: float = 1.0   # >1 discourages tokens already in the prompt or the output
    presence_penalty: float = 0.0     # subtracted once from tokens already in the output
    frequency_penalty: float = 0.0    # subtracted per occurrence in the output
    skip_special_tokens: bool = True
    detokenize: bool = True   # False: token ids only (benchmarks); stop strings need text
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice or grammar
    logprobs: int | None = None       # per generated token: its logprob and the top `logprobs` (0..20); None: off
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (0..20); None: off
    logprobs_mode: str = "raw_logprobs"  # raw_logprobs: log-softmax of the model's logits (vLLM's default);
    #                                      processed_logprobs: after temperature, penalties, bias and filters
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI)
    allowed_token_ids: list[int] | None = None  # only these tokens may be generated (vLLM)
    n: int = 1                        # samples of the prompt (1..128), prefilled once; sample i's seed: sample_seed
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        def bad(name: str, value, fix: str) -> ValueError:
            return ValueError(f"sampling parameter {name}={value!r} is invalid; {fix}")

        if self.stop is None:
            self.stop_list = []
        elif isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop)
        if any(not isinstance(s, str) or s == "" for s in self.stop_list):
            raise bad("stop", self.stop, "use a non-empty string or a list of them")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.stop_list and not self.detokenize:
            raise bad("stop", self.stop, "stop strings need detokenize=True")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not _finite(v):
                raise bad(name, v, "use a finite number")
        for name in ("top_k", "min_tokens"):
            if not is_int(getattr(self, name)):
                raise bad(name, getattr(self, name), "use an integer")
        if self.max_tokens is not None and not is_int(self.max_tokens):
            raise bad("max_tokens", self.max_tokens, "use an integer or None")
        if self.seed is not None and not (is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise bad("seed", self.seed, "use an integer in [0, 2**64) or None")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "use token ids (integers >= 0)")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        for name in ("ignore_eos", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "use True or False")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, "use a number >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "use a number in (0, 1]")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise bad("top_k", self.top_k, "use -1 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "use a number in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "use a positive integer")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", self.min_tokens, "use 0 <= min_tokens <= max_tokens")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "use a number > 0 (1 is off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, getattr(self, name), "use a number in [-2, 2]")
        if not (is_int(self.n) and 1 <= self.n <= MAX_N):
            raise bad("n", self.n, f"use an integer in [1, {MAX_N}]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and 0 <= v <= MAX_LOGPROBS):
                raise bad(name, v, f"use an integer in [0, {MAX_LOGPROBS}] or None")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise bad("logprobs_mode", self.logprobs_mode, f"use one of {', '.join(LOGPROBS_MODES)}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    is_int(k) and k >= 0 and isinstance(v, numbers.Real) and not isinstance(v, bool)
                    and _finite(v) and -100 <= v <= 100 for k, v in self.logit_bias.items()):
                raise bad("logit_bias", self.logit_bias, "use {token id: bias} with biases in [-100, 100]")
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(is_int(t) and t >= 0 for t in ids):
                raise bad("allowed_token_ids", ids, "use a non-empty list of token ids (integers >= 0) or None")
            self.allowed_token_ids = [int(t) for t in ids]
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise bad("structured_outputs", so, "use StructuredOutputsParams(json=..., regex=..., choice=..., "
                      "grammar=... or json_object=True) or None")
        if so is not None and not self.detokenize:
            raise bad("structured_outputs", so, "structured outputs are text: they need detokenize=True")

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_seed(seed: int, index: int) -> int:
    """Sample `index`'s seed from the request's: sample 0 keeps it (n = 1 samples as before), the others hash
    (seed, index), so a sample's text never depends on n, on batching or on a resumed run."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False
