"""flashgen.tokenizer.PieceCache: a long piece of text that recurs across prompts (a shared system message) is
tokenized once, and every text's ids stay exactly what the tokenizers library gives for the whole text; tokenizers
where a piece's ids depend on its place are left alone. Also: a truncation or padding in tokenizer.json never
cuts or pads a prompt."""
from __future__ import annotations

import json
import os
import pickle
import random
from array import array

import pytest
from tokenizers import Tokenizer as HF
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from checkpoints import CHAT_TEMPLATE, CORPUS, SPECIAL, _tokenizer_json
from flashgen.tokenizer import PieceCache, Tokenizer, added_token_pattern

WORDS = ["alpha", "Beta", " gamma", "  delta", "\n", "\n\n", "\t", "0123", "42", "naïve", "東京", "🎉", ".", ",",
         "don't", "    ", "x", "<", "|", ">", "im", "_start", "end"]


def _write(tmp_path, hf_json: str, **cfg) -> Tokenizer:
    (tmp_path / "tokenizer.json").write_text(hf_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, **cfg}))
    return Tokenizer(tmp_path)


def _metaspace(scheme: str, tmp_path, unigram: bool = False) -> Tokenizer:
    """A sentencepiece-like tokenizer (Metaspace pre-tokenizer) with the chat template's special tokens."""
    if unigram:
        tok = HF(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                          unk_token="<|endoftext|>")
    else:
        tok = HF(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False)
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.train_from_iterator(CORPUS * 20 + ["".join(WORDS)] * 5, trainer=trainer)
    return _write(tmp_path, tok.to_str())


def _texts(rng: random.Random, system: list[str], n: int) -> list[str]:
    """Chat prompts: one of `system`'s messages (long, recurring), a short random user text, special tokens around
    them and now and then inside them, whitespace and digits at the pieces' edges."""
    out = []
    for _ in range(n):
        user = "".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 40)))
        if rng.random() < 0.2:
            user += rng.choice(SPECIAL) + " tail"
        text = f"<|im_start|>system\n{rng.choice(system)}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        if rng.random() < 0.5:
            text += "<|im_start|>assistant\n"
        if rng.random() < 0.1:
            text = rng.choice(system) + text  # a long piece at the very start
        out.append(text)
    return out


def _systems(rng: random.Random, k: int = 3) -> list[str]:
    return [" " * rng.randrange(3) + "".join(rng.choice(WORDS) for _ in range(rng.randrange(120, 300)))
            + " " * rng.randrange(3) for _ in range(k)]


def _whole(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok._tok.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(params=["bytelevel", "metaspace-always", "unigram-always"])
def tok(request, tmp_path) -> Tokenizer:
    if request.param == "bytelevel":
        return _write(tmp_path, _tokenizer_json(400))
    return _metaspace("always", tmp_path, unigram=request.param.startswith("unigram"))


def test_pieces_give_the_whole_texts_ids(tok):
    rng = random.Random(0)
    assert tok._pieces is not None
    texts = _texts(rng, _systems(rng), 400)
    got = []
    for g in range(0, len(texts), 32):
        got += tok.encode_batch(texts[g:g + 32], add_special_tokens=False)
    got_one = [tok.encode(t, add_special_tokens=False) for t in texts[:50]]
    assert got == _whole(tok, texts)
    assert got_one == _whole(tok, texts[:50])
    # the long system messages were served from the cache, not tokenized each time
    assert tok._pieces.hits > 300
    # with add_special_tokens too, where the post-processor adds no token (ByteLevel's here, or none)
    assert tok._pieces.special_ok
    hits = tok._pieces.hits
    assert tok.encode_batch(texts[:40]) == [e.ids for e in tok._tok.encode_batch(texts[:40])]
    assert tok._pieces.hits > hits + 30
    # the int32 arrays a job's lines take: the same ids, and a kept piece's array is copied, never shared
    arrays = tok.encode_batch_ids(texts[:40], add_special_tokens=False)
    assert all(isinstance(a, array) and a.typecode == "i" for a in arrays)
    assert [a.tolist() for a in arrays] == _whole(tok, texts[:40])
    arrays[0][0] = -7
    assert tok.encode_batch_ids(texts[:1], add_special_tokens=False)[0].tolist() == _whole(tok, texts[:1])[0]


def test_a_post_processor_that_adds_tokens_keeps_them(tmp_path):
    """A BOS-adding post-processor (TemplateProcessing, as Llama 3's): texts with add_special_tokens go to the
    library whole, with their BOS; without, the cache serves them. A config that asks for BOS (add_bos_token) gets it
    in front of the cache's ids too."""
    from tokenizers import processors

    hf = HF.from_str(_tokenizer_json(400))
    bos = hf.token_to_id("<|endoftext|>")
    hf.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                      special_tokens=[("<|endoftext|>", bos)])
    (tmp_path / "a").mkdir()
    tok = _write(tmp_path / "a", hf.to_str())
    assert tok._pieces is not None and not tok._pieces.special_ok
    rng = random.Random(7)
    texts = _texts(rng, _systems(rng), 60)
    want = [e.ids for e in tok._tok.encode_batch(texts)]
    assert all(ids[0] == bos for ids in want)
    assert tok.encode_batch(texts) == want and [tok.encode(t) for t in texts[:5]] == want[:5]
    assert tok.encode_batch(texts, add_special_tokens=False) == _whole(tok, texts) and tok._pieces.hits > 40
    (tmp_path / "b").mkdir()
    plain = _write(tmp_path / "b", _tokenizer_json(400), bos_token="<|endoftext|>", add_bos_token=True)
    assert plain._pieces is not None and plain._pieces.special_ok and plain._prepend_bos
    assert plain.encode_batch(texts) == [[bos] + ids for ids in _whole(plain, texts)]
    assert [a.tolist() for a in plain.encode_batch_ids(texts)] == [[bos] + ids for ids in _whole(plain, texts)]
    assert [a.tolist() for a in tok.encode_batch_ids(texts)] == want  # the library's own BOS, not a second one
    assert plain.encode_batch(texts, add_special_tokens=False) == _whole(plain, texts)


def test_the_embedded_models_tokenizer(tmp_path):
    try:
        from flashgen.models.default_model import DEFAULT_MODEL, resolve_model

        tok = Tokenizer(resolve_model(DEFAULT_MODEL))
    except (ImportError, OSError, ValueError):
        pytest.skip("the embedded model's package is not installed")
    rng = random.Random(1)
    systems = _systems(rng)
    convs = [[{"role": "system", "content": rng.choice(systems)},
              {"role": "user", "content": "".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 60)))}]
             for _ in range(200)]
    texts = [tok.apply_chat_template(c) for c in convs] + _texts(rng, systems, 200)
    got = [ids for g in range(0, len(texts), 32) for ids in tok.encode_batch(texts[g:g + 32], add_special_tokens=False)]
    assert got == _whole(tok, texts)
    assert tok._pieces is not None and tok._pieces.hits > 300


def test_a_piece_is_kept_only_once_seen_twice(tok):
    rng = random.Random(2)
    systems = _systems(rng, 1)
    unique = [f"<|im_start|>user\n{s}<|im_end|>\n" for s in _systems(rng, 50)]
    tok.encode_batch(unique, add_special_tokens=False)
    assert tok._pieces._ids == {}  # each seen once: nothing kept
    text = f"<|im_start|>system\n{systems[0]}<|im_end|>\n"
    tok.encode_batch([text], add_special_tokens=False)
    assert tok._pieces._ids == {}
    assert tok.encode_batch([text, text], add_special_tokens=False) == _whole(tok, [text, text])
    assert list(tok._pieces._ids) == [f"system\n{systems[0]}"]
    hits = tok._pieces.hits
    assert tok.encode_batch([text], add_special_tokens=False) == _whole(tok, [text])
    assert tok._pieces.hits == hits + 1


def test_the_cache_is_bounded(tok, monkeypatch):
    monkeypatch.setattr(PieceCache, "MAX_CHARS", 2000)
    rng = random.Random(3)
    systems = _systems(rng, 20)
    texts = _texts(rng, systems, 300)
    got = [ids for g in range(0, len(texts), 16) for ids in tok.encode_batch(texts[g:g + 16], add_special_tokens=False)]
    assert got == _whole(tok, texts)
    p = tok._pieces
    assert 0 < p._chars <= 2000 and p._chars == sum(len(k) for k in p._ids)


def test_a_worker_gets_the_tokenizer_without_its_cache(tok):
    rng = random.Random(4)
    texts = _texts(rng, _systems(rng), 64)
    tok.encode_batch(texts, add_special_tokens=False)
    assert tok._pieces._ids
    copy = pickle.loads(pickle.dumps(tok))
    assert copy._pieces is not None and copy._pieces._ids == {} and copy._pieces.hits == 0
    assert copy.encode_batch(texts, add_special_tokens=False) == _whole(tok, texts)


def _by_pieces(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Every piece between added tokens tokenized by itself (what the cache would do), for any tokenizer."""
    return PieceCache(PieceCache.of(HF.from_str(_tokenizer_json(400)))._split)._by_pieces(
        tok._tok, texts, min_chars=1, keep=False)


def test_metaspace_first_is_left_alone(tmp_path):
    """With prepend_scheme "first" the library prepends to the text's first piece only, so a piece tokenized by
    itself would get a mark the whole text does not have: no cache, and the ids are the library's."""
    tok = _metaspace("first", tmp_path)
    text = "<|im_start|>system\nhello world<|im_end|>\n<|im_start|>user\nthe quick fox<|im_end|>\n"
    assert _by_pieces(tok, [text]) != _whole(tok, [text])  # the reason: it would differ
    assert tok._pieces is None
    assert tok.encode_batch([text] * 3, add_special_tokens=False) == _whole(tok, [text] * 3)


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word"])
def test_added_tokens_that_take_whitespace_are_left_alone(tmp_path, flag):
    doc = json.loads(_tokenizer_json(400))
    for t in doc["added_tokens"]:
        if t["content"] == "<|im_end|>":
            t[flag] = True
    tok = _write(tmp_path, json.dumps(doc))
    assert tok._pieces is None
    text = "<|im_start|>system\n  spaced out  <|im_end|>  \n<|im_start|>user\nhi<|im_end|>\n"
    assert tok.encode_batch([text], add_special_tokens=False) == _whole(tok, [text])


def test_special_tokens_read_as_text_are_left_alone(tmp_path):
    tok = _write(tmp_path, _tokenizer_json(400))
    tok._tok.encode_special_tokens = True
    assert PieceCache.of(tok._tok) is None


def test_a_tokenizer_without_added_tokens_has_no_cache(tmp_path):
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    t = _write(tmp_path, tok.to_str())
    assert t._pieces is None
    assert t.encode("The quick brown fox", add_special_tokens=False) == tok.encode("The quick brown fox").ids


def test_truncation_and_padding_in_the_file_never_cut_or_pad_a_prompt(tmp_path):
    doc = json.loads(_tokenizer_json(400))
    doc["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    doc["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    tok = _write(tmp_path, json.dumps(doc))
    plain = HF.from_str(_tokenizer_json(400))
    text = "The quick brown fox jumps over the lazy dog."
    want = plain.encode(text).ids
    assert len(want) > 4 and len(HF.from_str(json.dumps(doc)).encode(text).ids) == 64  # what the file asks for
    assert tok.encode(text) == want
    assert tok.encode_batch([text, "Hi"]) == [want, plain.encode("Hi").ids]
    assert tok.encode(text, add_special_tokens=False) == plain.encode(text, add_special_tokens=False).ids


def test_the_trie_pattern_finds_tokens_leftmost_longest():
    """As an alternation longest-first does (the library's leftmost-longest match), on random texts of the tokens'
    characters, with tokens that are prefixes and suffixes of each other."""
    import re

    tokens = ["ab", "abc", "b", "bc", "c", "<|im_start|>", "<|im_end|>", "<|im", "  ", "   ", "\n\n", "x<", "<x"]
    trie = re.compile(added_token_pattern(tokens))
    naive = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    rng = random.Random(5)
    chars = list("abcx<|>_imstrend \n")
    for _ in range(3000):
        text = "".join(rng.choice(chars) for _ in range(rng.randrange(0, 40)))
        assert [m.span() for m in trie.finditer(text)] == [m.span() for m in naive.finditer(text)], text


def test_a_tokenizer_with_thousands_of_added_tokens(tmp_path):
    """Gemma-like: thousands of reserved tokens and whitespace runs as added tokens: the cache is taken (its
    pattern is a trie, one test a character) and the ids stay the library's."""
    doc = json.loads(_tokenizer_json(400))
    next_id = max(t["id"] for t in doc["added_tokens"]) + 1
    extra = [f"<unused{i}>" for i in range(3000)] + [" " * k for k in range(2, 20)] + ["\n" * k for k in range(2, 20)]
    for i, content in enumerate(extra):
        doc["added_tokens"].append({"id": next_id + i, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": content.startswith("<")})
    tok = _write(tmp_path, json.dumps(doc))
    assert tok._pieces is not None
    rng = random.Random(6)
    prose = [" ".join(rng.choice(["alpha", "Beta", "gamma", "0123", "naïve", "東京", "x."]) for _ in range(80))
             for _ in range(2)]  # no whitespace run: those are added tokens here, and cut a text into short pieces
    texts = [t + "<unused17>  x   \n\n\n<unused2999>" for t in _texts(rng, prose, 120)]
    got = [ids for g in range(0, len(texts), 32) for ids in tok.encode_batch(texts[g:g + 32], add_special_tokens=False)]
    assert got == _whole(tok, texts)
    assert tok._pieces.hits > 50


def test_a_check_that_fails_leaves_the_cache_off(tmp_path, monkeypatch):
    def broken(hf):
        raise RuntimeError("a component that does not serialize")

    monkeypatch.setattr(PieceCache, "_of", classmethod(lambda cls, hf: broken(hf)))
    tok = _write(tmp_path, _tokenizer_json(400))
    assert tok._pieces is None
    text = "<|im_start|>system\n" + "words " * 100 + "<|im_end|>\n"
    assert tok.encode_batch([text, text, text], add_special_tokens=False) == _whole(tok, [text] * 3)


def test_a_job_tokenizes_on_two_threads_unless_told(monkeypatch, tmp_path):
    """flashgen generate sets the tokenizers library's pool (RAYON_NUM_THREADS) to JOB_TOKENIZER_THREADS before
    anything tokenizes, and leaves a value the user set alone."""
    from flashgen.jobs.generate import run_generate
    from flashgen.tokenizer import JOB_TOKENIZER_THREADS, job_tokenizer_threads

    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    missing = str(tmp_path / "no-such-input.jsonl")
    assert run_generate(missing, str(tmp_path / "out.jsonl"), None, {}) != 0  # refused: no input, no model
    assert os.environ["RAYON_NUM_THREADS"] == str(JOB_TOKENIZER_THREADS) == "2"
    monkeypatch.setenv("RAYON_NUM_THREADS", "8")
    assert job_tokenizer_threads() == "8" and os.environ["RAYON_NUM_THREADS"] == "8"
