"""Tokenizer wrapper and incremental detokenizer (chat templates render in chat_template.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .base import LoadError
from .chat_template import ChatTemplateError, render_isolated

# NOTE: `tokenizers` holds the GIL through encode() and decode(), but releases it in the batch
# calls: texts this long go through those, so the server's event loop keeps running meanwhile
# (a 2 MB prompt takes seconds to tokenize).
_LONG = 4096


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: BOS/EOS, the chat template."""

    def __init__(
        self,
        backend,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        add_bos: bool | None = None,
        extra_eos_ids: Sequence[int] = (),
    ):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.eos_ids = sorted({i for i in (eos_id, *extra_eos_ids) if i is not None})
        # NOTE: add_bos=None: the backend's own post-processor decides (tokenizer.json); True/False:
        # we prepend BOS ourselves (GGUF metadata says whether the model expects it).
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids --------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.add_bos is None:
            return self._encode(text, add_special_tokens)
        ids = self._encode(text, False)
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > _LONG:
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > _LONG:
            return self.backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes of one token as decoded alone (for logprob `bytes` fields)."""
        return self.backend.decode([i], skip_special_tokens=False).encode("utf-8", "replace")

    # ---- chat ----------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template; use /v1/completions, or start the server with --chat-template FILE"
            )
        return render_isolated(
            self.chat_template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs) -> list[int]:
        # NOTE: the template writes BOS itself where the model wants it, so no special tokens are
        # added on top (what transformers' apply_chat_template(tokenize=True) does).
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)


# ---- loading ------------------------------------------------------------------------------------
def load_hf_tokenizer(directory: Path, extra_eos_ids: Sequence[int] = ()) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json, chat_template.jinja/json) from a model directory."""
    from tokenizers import Tokenizer as Backend

    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    tj = directory / "tokenizer.json"
    if tj.exists():
        backend = Backend.from_file(str(tj))
    elif (directory / "tokenizer.model").exists():
        # NOTE: SentencePiece-only repos: transformers converts the model to a fast tokenizer.
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(directory)).backend_tokenizer
    else:
        raise LoadError(f"no tokenizer.json or tokenizer.model in {directory}; pass a tokenizer with the model")
    template = cfg.get("chat_template")
    for name in ("chat_template.jinja",):
        if (directory / name).exists():
            template = (directory / name).read_text()
    if template is None and (directory / "chat_template.json").exists():
        template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return Tokenizer(
        backend,
        bos_token=_token_str(cfg.get("bos_token")),
        eos_token=_token_str(cfg.get("eos_token")),
        chat_template=template,
        extra_eos_ids=extra_eos_ids,
    )


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


# ---- streaming detokenization ---------------------------------------------------------------------
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without breaking multi-byte characters.

    NOTE: each delta is decode(ids[prefix:]) minus decode(ids[prefix:read]): decoding a window that
    starts a few tokens back keeps leading spaces right (SentencePiece drops the space of a token
    decoded alone), and a trailing U+FFFD means a character is still incomplete, so it waits."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-5:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character is emitted as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
