"""A request as the engine sees it: its tokens, its KV blocks, its progress, its detokenization state."""
from __future__ import annotations

import enum
import itertools
from array import array
from collections.abc import Sequence as Ids
from typing import Any

from flashgen.engine.logprobs import LogprobsList
from flashgen.engine.sampler import PRESENCE_FREQUENCY, sampling_flags
from flashgen.sampling_params import SamplingParams

PLACEHOLDER = -1  # a sampled token still on the GPU (pipelined decode); replaced when it is read


class Status(enum.Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


class Sequence:
    _ids = itertools.count()

    def __init__(self, request_id: str, prompt: str | None, token_ids: Ids[int], params: SamplingParams,
                 block_size: int, seed: int, index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index                     # which of the request's n samples this is
        self.followers: list[Sequence] = []    # samples 1..n-1, forked from this one once its prompt is computed
        self.prompt = prompt
        # prompt + generated, as int32 in an array: no Python int object a token, and nothing for the garbage
        # collector to walk (a list of a job's 1,200-token prompt is 1,200 references each young pass visits)
        self.token_ids = array("i", token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        # what build_sampling_batch needs to look for in params (sampler.sampling_flags): params are the engine's
        # once the request is added, and a sample's own params are made with it
        self.sampling_flags = sampling_flags(params)
        self.block_size = block_size
        self.seed = seed
        self.status = Status.WAITING
        # its KV block ids, int32 like the packed step: pack_step joins the tables' bytes, no int object a block
        self.block_table = array("i")
        self.num_cached_tokens = 0             # prompt tokens served by the prefix cache (last allocation)
        self.num_computed_tokens = 0           # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0          # tokens this step computes (prefill chunk or 1)
        self.end_len: int | None = None        # the length it may reach (end_length's cache)
        self.end_blocks: int | None = None     # blocks at that length (Scheduler._end_blocks' cache)
        self.output_counts: dict[int, int] = {}  # generated token -> occurrences, kept for presence/frequency
        # a constrained request's llguidance matcher, while its grammar compiles a PendingMatcher (engine.grammar)
        self.matcher: Any = None
        self.logprobs = LogprobsList()  # params.logprobs: one entry per generated token
        self.cumulative_logprob = 0.0
        # params.prompt_logprobs: entry p for prompt token p (None for the first: nothing predicts it)
        self.prompt_logprobs = LogprobsList([None])
        # incremental detokenization (see flashgen.engine.detokenizer)
        ctx = token_ids[-5:]
        self.detok_ids: list[int] = list(ctx)
        self.prefix_offset, self.read_offset = 0, len(ctx)
        self.output_text = ""
        self.finish_reason: str | None = None
        # detokenizer.quick_stop's (stop ids, end length), filled by the engine on the sequence's first token
        self.quick_stop: tuple[frozenset[int], int] | None = None
        self.stop_reason: str | int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:].tolist()

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def end_length(self, max_model_len: int) -> int:
        """The length this sequence may reach: its prompt plus max_tokens, or the context (kept: its prompt,
        max_tokens and the context never change). The scheduler holds it there; the engine ends it there."""
        if self.end_len is None:
            mt = self.params.max_tokens if self.params is not None else None
            self.end_len = max_model_len if mt is None else min(self.num_prompt_tokens + mt, max_model_len)
        return self.end_len

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block_tokens(self, i: int) -> array:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def prefix_cache_ok(self) -> bool:
        """Whether cached prompt blocks may stand in for computing them: not while prompt logprobs (which
        need every prompt position's logits) are still to be computed."""
        p = self.params
        return p is None or p.prompt_logprobs is None or len(self.prompt_logprobs) >= self.num_prompt_tokens

    def reserve_token(self) -> int:
        """Hold the place of a token a launched step will sample; its index."""
        self.token_ids.append(PLACEHOLDER)
        return len(self.token_ids) - 1

    def set_token(self, idx: int, token: int) -> None:
        """Put the sampled `token` at `idx` (where reserve_token held its place)."""
        self.token_ids[idx] = token
        if self.sampling_flags & PRESENCE_FREQUENCY:  # the one reader of the counts (build_sampling_batch)
            self.output_counts[token] = self.output_counts.get(token, 0) + 1

    @property
    def last_token_known(self) -> bool:
        """False while the latest token is still on the GPU (pipelined decode)."""
        return self.token_ids[-1] != PLACEHOLDER

    def truncate(self, n: int) -> None:
        """Keep the first `n` tokens: drops reserved places after the end of a finished request."""
        del self.token_ids[n:]
