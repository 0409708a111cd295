"""Tokenizer: tokenizer.json through `tokenizers`, special tokens and chat template from tokenizer_config.json."""
from __future__ import annotations

import json
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


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self._tok = _read_tokenizer(model_dir / "tokenizer.json")
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

    def to_json(self) -> str:
        """tokenizer.json as the tokenizers library serialises it (llguidance builds its token trie from it)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self._prepend_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() of each text, in one call: the tokenizers library runs it outside the GIL, on all cores."""
        encs = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        bos = self.bos_token_id
        if not (add_special_tokens and self._prepend_bos and bos is not None):
            return [e.ids for e in encs]
        return [ids if ids[:1] == [bos] else [bos] + ids for ids in (e.ids for e in encs)]

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
