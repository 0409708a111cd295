"""What the engine hands back for each finished request."""
from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)
