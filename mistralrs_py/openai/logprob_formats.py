"""Token logprobs in the shapes clients read: OpenAI's chat and text-completion shapes, and vLLM's
prompt_logprobs."""

from __future__ import annotations

from typing import Optional

from ..engine.request import TokenLogprob
from ..pipeline.tokenizer import Tokenizer


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> dict:
    def entry(tid: int, lp: float) -> dict:
        b = tok.token_bytes(tid)
        return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in lps]}


def completion_logprobs(tok: Tokenizer, lps: list[TokenLogprob], text_start: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_start
    for t in lps:
        s = tok.token_bytes(t.token_id).decode("utf-8", "replace")
        tokens.append(s)
        token_lps.append(t.logprob)
        top: dict[str, float] = {}
        for i, v in t.top:  # NOTE: two tokens can share a text (byte fragments); keep the likelier
            top.setdefault(tok.token_bytes(i).decode("utf-8", "replace"), v)
        tops.append(top)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_completion_logprobs(tok: Tokenizer, ids: list[int], lps: list[Optional[TokenLogprob]]) -> dict:
    """The prompt's part of a text completion's logprobs (echo): the first token has no logprob
    (null, as OpenAI gives it), offsets count from the start of the prompt's text."""
    first = tok.token_bytes(ids[0]).decode("utf-8", "replace")
    rest = completion_logprobs(tok, [lp for lp in lps[1:] if lp is not None], len(first))
    return {
        "tokens": [first, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def vllm_prompt_logprobs(tok: Tokenizer, ids: list[int], lps: list[Optional[TokenLogprob]]) -> list:
    """vLLM's `prompt_logprobs`: per prompt position null (the first) or {token id: {logprob,
    decoded_token}} for the prompt's token and its best alternatives."""
    out: list = []
    for i, tid in enumerate(ids):
        lp = lps[i] if i < len(lps) else None
        if lp is None:
            out.append(None)
            continue
        entry = {str(tid): {"logprob": lp.logprob, "decoded_token": tok.token_bytes(tid).decode("utf-8", "replace")}}
        for t, v in lp.top:
            entry.setdefault(str(t), {"logprob": v, "decoded_token": tok.token_bytes(t).decode("utf-8", "replace")})
        out.append(entry)
    return out
