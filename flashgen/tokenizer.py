"""Tokenizer: tokenizer.json through `tokenizers`, special tokens and chat template from tokenizer_config.json."""
from __future__ import annotations

import json
import os
import re
import threading
from array import array
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer as HFTokenizer

from flashgen.models.errors import ModelFileMissing, ModelLoadError, read_json_object

if TYPE_CHECKING:
    import jinja2


def _token_str(v) -> str | None:
    # tokenizer_config stores special tokens as plain strings or as AddedToken dicts
    return v.get("content") if isinstance(v, dict) else v


def _read_tokenizer(path: Path) -> HFTokenizer:
    if not path.is_file():
        raise ModelFileMissing(f"{path}: not found; flashgen needs a fast tokenizer (tokenizer.json): "
                               "download it with the checkpoint")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for any file it cannot parse
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise ModelLoadError(f"{path}: not a valid tokenizer.json ({why}); "
                             "download it with the checkpoint again") from None


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    fix = "fix the file or download it with the checkpoint again"
    cfg = read_json_object(path, fix, "tokenizer settings")
    for key in ("bos_token", "eos_token"):
        v = cfg.get(key)
        if not (v is None or isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))):
            raise ModelLoadError(f"{path}: {key}={v!r} must be a token string or an object with 'content'; {fix}")
    tpl = cfg.get("chat_template")
    if not (tpl is None or isinstance(tpl, str) or (isinstance(tpl, list) and tpl and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in tpl))):
        raise ModelLoadError(f"{path}: chat_template must be a string or a list of {{name, template}} objects; {fix}")
    return cfg


def added_token_pattern(tokens: list[str]) -> str:
    """A regular expression that finds `tokens` in a text as the tokenizers library does: leftmost, and at each
    place the longest. Built as a trie (one branch per next character, a shorter token's end an optional longer
    continuation, tried first), so a scan does one test per character however many tokens there are: an alternation
    of Gemma's ~6,000 added tokens took 21 ms on a 5 KB prompt, the trie 72 us (tools/probes/tokenize_probe.py
    --patterns)."""
    trie: dict[str, dict] = {}
    for t in tokens:
        node = trie
        for ch in t:
            node = node.setdefault(ch, {})
        node[""] = {}  # a token ends here

    def emit(node: dict[str, dict]) -> str:
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


JOB_TOKENIZER_THREADS = 2


def job_tokenizer_threads() -> str:
    """A job's tokenizers thread pool: JOB_TOKENIZER_THREADS threads unless RAYON_NUM_THREADS says otherwise (set
    before the library's first batch in the process, which builds the pool for good). With the piece cache a job's
    line needs little of the pool, and one thread a core took the cores from the engine's thread: on a 16-core GPU
    host the preparation delayed it 0.53 ms a wait with 16 threads, 0.27 ms with 2 (BENCHMARKS.md, seventeenth
    session). Returns the setting in force."""
    return os.environ.setdefault("RAYON_NUM_THREADS", str(JOB_TOKENIZER_THREADS))


class PieceCache:
    """Token ids of long pieces of text that recur across prompts (a job's shared system message), so that each is
    tokenized once instead of once a line.

    The tokenizers library first cuts a text at its added tokens (the special tokens a chat template writes: those
    not normalized), then runs the normalizer, the pre-tokenizer and the model on each piece by itself. A text's ids
    are therefore its pieces' ids and its added tokens', in order, and any run of whole pieces can be tokenized on
    its own. A piece of at least MIN_CHARS characters seen a second time is tokenized by itself and its ids kept
    (least recently used out past MAX_CHARS characters in all); a text is then tokenized as the runs between its
    kept pieces, all of a batch's runs and new pieces in one encode_batch call.

    Only where a piece's ids cannot depend on what stands around it (`of` checks): not when an added token strips
    whitespace beside it or must stand as a word (lstrip, rstrip, single_word), when the pre-tokenizer prepends only
    to the text's first piece (Metaspace with prepend_scheme "first"), when special tokens are tokenized as text, or
    when the model drops merges at random (BPE dropout); with add_special_tokens only where the post-processor adds no
    token (ByteLevel's, or none: `special_ok`), since its tokens go around the whole text. `of` also tokenizes a few
    texts both ways and gives up on any difference."""

    MIN_CHARS = 256
    MAX_CHARS = 1 << 21  # ~2 M characters of kept pieces: ~0.5 M ids, kept as int32 arrays (~2 MB)
    SEEN = 4096  # hashes of long pieces seen once, remembered (oldest forgotten first)
    PROBES = ("  lead and trail  ", "\n\ndigits 0123 and 4567\n", "naïve café 東京 🎉 ", " x", "\t", "end.  ")

    def __init__(self, split: re.Pattern):
        self._split = split
        self._ids: dict[str, array] = {}  # a kept piece's ids, int32
        self._chars = 0
        self._seen: dict[int, None] = {}
        self._lock = threading.Lock()
        # whether add_special_tokens changes no ids (the post-processor adds none): then such texts use the cache too
        self.special_ok = False
        self.hits = 0        # long pieces not tokenized again (kept, or tokenized by themselves earlier in the call)
        self.hit_chars = 0   # their characters

    def __getstate__(self) -> dict:
        """Pickled (a preparation worker, flashgen.jobs.prepare_pool) without its cache or its lock."""
        return {"_split": self._split, "special_ok": self.special_ok}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_split"])  # type: ignore[misc]
        self.special_ok = state["special_ok"]

    @classmethod
    def of(cls, hf: HFTokenizer) -> PieceCache | None:
        """A cache for `hf`, or None where a piece's ids may depend on its place (see the class), or where this
        version of the tokenizers library does not show what the check needs: the cache only ever saves time."""
        try:
            return cls._of(hf)
        except Exception:  # noqa: BLE001 - e.g. a component that does not serialize: tokenize whole prompts
            return None

    @classmethod
    def _of(cls, hf: HFTokenizer) -> PieceCache | None:
        if getattr(hf, "encode_special_tokens", False) or getattr(hf.model, "dropout", None):
            return None
        pre = hf.pre_tokenizer
        if pre is not None:
            def first_only(node) -> bool:
                if isinstance(node, dict):
                    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                        return True
                    return any(first_only(v) for v in node.values())
                return isinstance(node, list) and any(first_only(v) for v in node)
            if first_only(json.loads(pre.__getstate__())):
                return None
        added = [t for t in hf.get_added_tokens_decoder().values() if t.content and not t.normalized]
        if not added or any(t.lstrip or t.rstrip or t.single_word or len(t.content) > 100 for t in added):
            return None  # (a token of over 100 characters: the trie's regular expression would nest too deep)
        contents = sorted({t.content for t in added}, key=len, reverse=True)
        cache = cls(re.compile(added_token_pattern(contents)))
        sep = contents[-1]
        probes = [(sep if i % 3 == 0 else "") + sep.join(cls.PROBES[i:] + cls.PROBES[:i]) + (sep if i % 2 else "")
                  for i in range(len(cls.PROBES))]
        whole = [e.ids for e in hf.encode_batch(probes, add_special_tokens=False)]
        if [a.tolist() for a in cache._by_pieces(hf, probes, min_chars=1, keep=False)] != whole:
            return None
        cache.special_ok = [e.ids for e in hf.encode_batch(probes, add_special_tokens=True)] == whole
        return cache

    def encode_batch(self, hf: HFTokenizer, texts: list[str]) -> list[array]:
        """hf.encode_batch(texts, add_special_tokens=False)'s ids as int32 arrays, the kept pieces not tokenized
        again (a kept piece's ids join a text's by one copy of its array, not an int object a token)."""
        return self._by_pieces(hf, texts, self.MIN_CHARS, keep=True)

    def _by_pieces(self, hf: HFTokenizer, texts: list[str], min_chars: int, keep: bool) -> list[array]:
        """Each text's ids from its runs and its long pieces; with keep=False every long piece is tokenized by
        itself and nothing is kept (`of`'s check)."""
        runs: list[str] = []
        fresh: dict[str, int] = {}   # long pieces tokenized by themselves in this call: their index in `runs`
        plans: list[list[int | array]] = []  # each text's parts: an index in `runs`, or a kept piece's ids
        with self._lock:
            for text in texts:
                plan: list[int | array] = []
                start = pos = 0  # start of the current run; start of the current piece
                for m in [*self._split.finditer(text), None]:
                    end = m.start() if m is not None else len(text)
                    if end - pos >= min_chars:
                        piece = text[pos:end]
                        part = self._part(piece, fresh, runs) if keep else self._alone(piece, fresh, runs)
                        if part is not None:
                            if start < pos:
                                plan.append(len(runs))
                                runs.append(text[start:pos])
                            plan.append(part)
                            start = end
                    pos = m.end() if m is not None else end
                if start < len(text) or not plan:
                    plan.append(len(runs))
                    runs.append(text[start:])
                plans.append(plan)
        ids = [e.ids for e in hf.encode_batch(runs, add_special_tokens=False)] if runs else []
        if keep and fresh:
            with self._lock:
                for piece, i in fresh.items():
                    self._keep(piece, array("i", ids[i]))
        out = []
        for plan in plans:
            row = array("i")
            for step in plan:
                if isinstance(step, int):
                    row.fromlist(ids[step])
                else:
                    row.extend(step)  # int32 into int32: a copy of the bytes
            out.append(row)
        return out

    def _part(self, piece: str, fresh: dict[str, int], runs: list[str]) -> int | array | None:
        """A long piece's part of its text: its kept ids, its index in `runs` (tokenized by itself now: the
        second time it is seen), or None (seen once so far: it stays in its run)."""
        ids = self._ids.get(piece)
        if ids is None and piece not in fresh:
            h = hash(piece)
            if h not in self._seen:
                self._seen[h] = None
                if len(self._seen) > self.SEEN:
                    del self._seen[next(iter(self._seen))]
                return None
            return self._alone(piece, fresh, runs)
        self.hits += 1  # kept, or tokenized by itself earlier in this call
        self.hit_chars += len(piece)
        if ids is None:
            return fresh[piece]
        self._ids[piece] = self._ids.pop(piece)  # most recently used
        return ids

    @staticmethod
    def _alone(piece: str, fresh: dict[str, int], runs: list[str]) -> int:
        """The piece's index in `runs`, where it is tokenized by itself in this call (added the first time)."""
        i = fresh.get(piece)
        if i is None:
            i = fresh[piece] = len(runs)
            runs.append(piece)
        return i

    def _keep(self, piece: str, ids: array) -> None:
        if piece in self._ids or len(piece) > self.MAX_CHARS:
            return
        self._ids[piece] = ids
        self._chars += len(piece)
        while self._chars > self.MAX_CHARS:
            old = next(iter(self._ids))
            self._chars -= len(old)
            del self._ids[old]


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self._tok = _read_tokenizer(model_dir / "tokenizer.json")
        # A truncation or padding that tokenizer.json asks for would cut or pad prompts silently: the engine checks
        # lengths itself (as transformers does, which sets them per call)
        self._tok.no_truncation()
        self._tok.no_padding()
        self._pieces = PieceCache.of(self._tok)
        cfg = _read_config(model_dir / "tokenizer_config.json")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.chat_template = cfg.get("chat_template")
        tpl_file = model_dir / "chat_template.jinja"  # transformers >= 4.47 writes the template here
        if self.chat_template is None and tpl_file.is_file():
            try:
                self.chat_template = tpl_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"{tpl_file}: cannot be read as UTF-8 text ({e}); fix the file or delete it "
                                     "(then prompts with 'messages' cannot run)") from None
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values())))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        # Add BOS ourselves only when the config asks for it and tokenizer.json's post-processor does not.
        self._prepend_bos = bool(cfg.get("add_bos_token")) and self.bos_token_id is not None and (
            self._tok.encode("a").ids[:1] != [self.bos_token_id])
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template: jinja2.Template | None = None  # compiled on first use

    def __getstate__(self) -> dict:
        """For a process of its own (flashgen.jobs.prepare_pool): the compiled chat template stays behind (its
        environment holds lambdas) and is compiled again there on first use."""
        return {**self.__dict__, "_template": None}

    @property
    def piece_cache(self) -> PieceCache | None:
        """The cache of recurring prompt pieces (its hits), or None where this tokenizer does not take one."""
        return self._pieces

    def to_json(self) -> str:
        """tokenizer.json as the tokenizers library serialises it (llguidance builds its token trie from it)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._use_pieces(add_special_tokens):
            return self._piece_ids([text], add_special_tokens)[0].tolist()
        return self._with_bos(self._tok.encode(text, add_special_tokens=add_special_tokens).ids, add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() of each text, in one call: the tokenizers library runs it outside the GIL, on its thread pool (one
        thread a core, or job_tokenizer_threads' in a job); a long piece of text that recurs (a shared system
        message) is tokenized once (PieceCache)."""
        if self._use_pieces(add_special_tokens):
            return [a.tolist() for a in self._piece_ids(texts, add_special_tokens)]
        return [self._with_bos(e.ids, add_special_tokens)
                for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_batch_ids(self, texts: list[str], add_special_tokens: bool = True) -> list[array]:
        """encode_batch's ids as int32 arrays, what a job's prepared lines and the engine hold: from the piece
        cache without a Python int a token in between."""
        if self._use_pieces(add_special_tokens):
            return self._piece_ids(texts, add_special_tokens)
        return [array("i", ids) for ids in self.encode_batch(texts, add_special_tokens)]

    def _piece_ids(self, texts: list[str], add_special_tokens: bool) -> list[array]:
        """The texts' int32 ids through the piece cache (where _use_pieces), BOS added as the config asks."""
        assert self._pieces is not None
        return [self._with_bos(a, add_special_tokens) for a in self._pieces.encode_batch(self._tok, texts)]

    def _use_pieces(self, add_special_tokens: bool) -> bool:
        """Whether the piece cache tokenizes: always without special tokens; with them only where the
        post-processor adds none (PieceCache.special_ok), as ByteLevel's and a missing one do."""
        return self._pieces is not None and (not add_special_tokens or self._pieces.special_ok)

    def _with_bos(self, ids, add_special_tokens: bool):
        """BOS in front (of a list or an int32 array) where the config asks for it and the post-processor did not
        add it."""
        bos = self.bos_token_id
        if add_special_tokens and self._prepend_bos and bos is not None and (not ids or ids[0] != bos):
            return (array("i", [bos]) if isinstance(ids, array) else [bos]) + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("the model has no chat template (tokenizer_config.json 'chat_template' or "
                             "chat_template.jinja); give a plain 'prompt' instead of 'messages'")
        if self._template is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise jinja2.TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")
