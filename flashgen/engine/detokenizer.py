"""Detokenization and stop checks.

Byte-level BPE splits a character across tokens; decoding a window of ids and emitting only text that does
not end in U+FFFD keeps every emitted piece whole UTF-8. The window starts a few tokens back (prompt tokens
at first) so tokenizers that drop a leading space at the start of a decode still produce the right spacing.

Only a request with stop strings needs its text while it runs (check_stop looks for them in it): it is
detokenized token by token (detokenize_step, then flush). Every other request's text is decoded once when it
finishes (decode_output), the same window and the same text, without two decode calls per token on the engine's
thread: the text is only returned with the finished request.
"""
from __future__ import annotations

from flashgen.engine.sequence import Sequence
from flashgen.sampling_params import SamplingParams
from flashgen.tokenizer import Tokenizer


def incremental(params: SamplingParams) -> bool:
    """Whether a request's text is built token by token (it has stop strings to look for) rather than decoded
    once when it finishes (decode_output)."""
    return params.detokenize and bool(params.stop_list)


def detokenize_step(tok: Tokenizer, seq: Sequence, token: int) -> str:
    """Append `token` to the window and return the newly complete text (maybe empty)."""
    seq.detok_ids.append(token)
    skip = seq.params.skip_special_tokens
    prefix = tok.decode(seq.detok_ids[seq.prefix_offset:seq.read_offset], skip)
    full = tok.decode(seq.detok_ids[seq.prefix_offset:], skip)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.detok_ids)
        # keep the window short: drop what no later decode needs
        if seq.prefix_offset > 64:
            del seq.detok_ids[:seq.prefix_offset]
            seq.read_offset -= seq.prefix_offset
            seq.prefix_offset = 0
        return delta
    return ""


def decode_output(tok: Tokenizer, seq: Sequence, n_tokens: int) -> str:
    """The text of the sequence's output tokens up to its n_tokens-th token, decoded at once with
    detokenize_step's first window (the prompt's last tokens) in front: what detokenize_step's deltas and flush
    add up to (an incomplete character at the end decodes to U+FFFD, as HF does)."""
    skip = seq.params.skip_special_tokens
    window = seq.detok_ids[seq.prefix_offset:]
    prefix = tok.decode(window, skip)
    full = tok.decode(window + seq.token_ids[seq.num_prompt_tokens:n_tokens].tolist(), skip)
    return full[len(prefix):] if len(full) > len(prefix) else ""


def flush(tok: Tokenizer, seq: Sequence) -> str:
    """Text still held back at the end (an incomplete character decodes to U+FFFD, as HF does)."""
    skip = seq.params.skip_special_tokens
    prefix = tok.decode(seq.detok_ids[seq.prefix_offset:seq.read_offset], skip)
    full = tok.decode(seq.detok_ids[seq.prefix_offset:], skip)
    return full[len(prefix):] if len(full) > len(prefix) else ""


def quick_stop(seq: Sequence, eos_ids: set[int], max_model_len: int) -> tuple[frozenset[int], int]:
    """What check_stop needs to know of a token of `seq`: (the ids that may stop it, the length at which it
    ends). A token not among those ids, at a length below that one, changes nothing: the engine skips
    check_stop and the detokenizer for it. A sequence whose text is built token by token (incremental: its stop
    strings are looked for in the text) gets end length 0: every one of its tokens is checked."""
    p = seq.params
    if incremental(p):
        return frozenset(), 0
    ids = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(eos_ids))
    return frozenset(ids), seq.end_length(max_model_len)


def check_stop(seq: Sequence, token: int, eos_ids: set[int], max_model_len: int, delta: str,
               n_tokens: int) -> None:
    """Set seq.finish_reason (and stop_reason) if `token`, the sequence's n_tokens-th token, or the new text
    `delta` ends the request."""
    p = seq.params
    n_out = n_tokens - seq.num_prompt_tokens
    if n_out >= p.min_tokens:
        if p.stop_token_ids and token in p.stop_token_ids:  # a list after SamplingParams.__post_init__
            seq.finish_reason, seq.stop_reason = "stop", token
            return
        if token in eos_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
            return
        if p.stop_list and delta:
            longest = max(map(len, p.stop_list))
            start = max(0, len(seq.output_text) - len(delta) - longest + 1)
            hits = [(i, s) for s in p.stop_list if (i := seq.output_text.find(s, start)) != -1]
            if hits:
                i, s = min(hits)
                seq.output_text = seq.output_text[:i]
                seq.finish_reason, seq.stop_reason = "stop", s
                return
    if (p.max_tokens is not None and n_out >= p.max_tokens) or n_tokens >= max_model_len:
        seq.finish_reason = "length"
