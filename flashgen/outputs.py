"""What the engine hands back for each finished request."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One candidate token at one position (vLLM's shape)."""
    logprob: float                   # natural log of its probability (see SamplingParams.logprobs_mode)
    rank: int                        # 1 = the most likely token at that position
    decoded_token: str | None = None  # the token's text (None when detokenize is off)


# One position's candidates: token id -> Logprob; the chosen token (sampled, or the prompt's next token) is
# always in it, with the top `logprobs` tokens.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of a request's n samples (vLLM's shape)."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str               # "stop", "length" or "error"
    stop_reason: str | int | None = None
    logprobs: Sequence[PositionLogprobs] | None = None  # a list, or the engine's lazy LogprobsList
    cumulative_logprob: float | None = None
    error_code: str | None = None
    error: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None               # the prompt text, when the request was given as text
    prompt_token_ids: list[int]
    text: str                        # generated text, stop string left out
    token_ids: list[int]             # generated token ids (a matched stop token is included, as in vLLM)
    finish_reason: str               # "stop" (EOS, stop string or stop token), "length", or "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it; None for EOS / length
    num_cached_tokens: int = 0       # prompt tokens served from the prefix cache
    error_code: str | None = None    # finish_reason "error": what went wrong with this request alone
    error: str | None = None         #   (e.g. "non_finite_logits"), and a message saying so; others ran on
    logprobs: Sequence[PositionLogprobs] | None = None  # SamplingParams.logprobs: one entry per generated token
    prompt_logprobs: Sequence[PositionLogprobs | None] | None = None  # SamplingParams.prompt_logprobs: per prompt
    #                                                   token, None for the first (nothing predicts it)
    cumulative_logprob: float | None = None  # sum of the generated tokens' logprobs (with logprobs on)
    # every sample (SamplingParams.n), by index; the fields above are sample 0's. A request is an "error" when
    # any sample failed (error_code / error: the first failure's).
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)
