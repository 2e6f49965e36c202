"""One generation in flight: its tokens, status, cache blocks and the text it has produced.

The scheduler alone sets `status`, `slot`, `block_table` and `num_cached`; the engine's update step appends tokens."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from .request import Request, TokenLogprob

if TYPE_CHECKING:
    from ..pipeline.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"

    @property
    def is_finished(self) -> bool:
        return self is SeqStatus.FINISHED


class Sequence:
    def __init__(self, request: Request, index: int, detokenizer: "IncrementalDetokenizer", generator=None):
        self.request = request
        self.index = index  # choice index within the request (n > 1)
        self.tokens: list[int] = list(request.prompt_ids)
        self.prompt_len = len(self.tokens)
        self.num_cached = 0  # tokens whose keys/values are in the cache
        self.slot: int | None = None  # the pipeline's per-sequence state (X-LoRA), while running
        self.block_table: list[int] = []  # the cache blocks holding its keys, in order
        self.block_hashes: list[bytes] = []  # the prefix cache's hash of each full block so far
        self.num_committed = 0  # blocks registered in the prefix cache
        self.cached_prompt_tokens: int | None = None  # prompt tokens found cached when first admitted
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.detok = detokenizer
        self.generator = generator
        self.text = ""  # output text so far, stop strings cut
        self.sent = 0  # characters of `text` already emitted
        self.pending_ids: list[int] = []  # token ids not yet emitted with text
        self.pending_logprobs: list[TokenLogprob] = []
        # NOTE: the prompt's logprobs are computed once per prompt position, by the choice that
        # prefills the prompt (n > 1 choices copy its cache): a sequence preempted mid-prompt keeps
        # those it has, and its recompute scores only the positions after them (prompt_rows_to_score)
        self.wants_prompt_logprobs = request.params.prompt_logprobs is not None and index == 0
        # entry i: the logprob of prompt token i (the first token has none: None)
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if self.wants_prompt_logprobs else None
        if self.prompt_len <= 1:
            self.wants_prompt_logprobs = False  # one token: nothing to score
        self._prompt_sent = False
        self.share_from: Sequence | None = None  # choice 0 of the same request: copy its prompt cache
        # NOTE: the output grammar's state (an llguidance matcher): the model runner reads its mask,
        # the engine's update step advances it with each sampled token
        grammar = request.params.grammar
        self.matcher = grammar.matcher() if grammar is not None else None
        # NOTE: an answer held to a grammar ends where the grammar is complete (or at max_tokens):
        # stop strings and stop token ids do not cut it, so a schema's answer always validates
        # unless max_tokens cut it (vLLM lets them cut one: `{"a":2` at a stop string ",")
        strings = request.params.stop_strings
        self.stops = strings.matcher() if strings is not None and self.matcher is None else None
        self.stop_token_ids = request.params.stop_token_ids if self.matcher is None else ()

    @property
    def params(self):
        return self.request.params

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def num_uncached(self) -> int:
        return len(self.tokens) - self.num_cached

    @property
    def is_decoding(self) -> bool:
        """One token left to compute, and it is not the prompt's: a decode row. (A prompt whose
        cached prefix leaves one token runs it as a prompt chunk, as pipelines expect of prompts.)"""
        return self.num_uncached == 1 and self.num_cached >= self.prompt_len

    def __repr__(self) -> str:
        return f"Sequence({self.request.id}#{self.index}, {self.status.value}, len={len(self.tokens)}, cached={self.num_cached})"

    # ---- pure state updates ------------------------------------------------------------------
    def append(self, token: int, max_len: int, eos_ids: list[int]) -> None:
        """Adds a sampled token and decides whether the sequence is finished (stop token, stop string,
        max_tokens or a full context). Text is updated; the caller emits `take_delta()`."""
        self.tokens.append(token)
        self.pending_ids.append(token)
        p = self.params
        if token in self.stop_token_ids or (not p.ignore_eos and token in eos_ids):
            # NOTE: the stop token's own text is never part of the output.
            self.finish("stop", token)
            self.text += self.detok.flush()
            return
        if self._add_text(self.detok.add(token)):
            return
        if self.matcher is not None and self.matcher.is_stopped():
            # NOTE: the grammar is complete and only EOS could follow: stop here, a step earlier
            self.finish("stop")
            self._add_text(self.detok.flush())
            return
        if p.max_tokens is not None and self.num_output >= p.max_tokens or len(self.tokens) >= max_len:
            self.finish("length")
            self._add_text(self.detok.flush())

    def _add_text(self, delta: str) -> bool:
        """Appends decoded text; True when a stop string completed in it (the text is cut before it)."""
        if not delta:
            return False
        self.text += delta
        hit = self.stops.feed(delta) if self.stops is not None else None
        if hit is None:
            return False
        start, stop = hit
        self.text = self.text[:start]
        self.finish("stop", stop)
        return True

    def prompt_rows_to_score(self, start: int, n: int) -> range:
        """The positions of a prompt chunk [start, start + n) whose rows score a prompt token not
        scored yet (the row at position p scores token p + 1; the prompt's last row predicts the
        first output token, which is sampled, not scored). Empty once the prompt is scored."""
        if not self.wants_prompt_logprobs:
            return range(0)
        known = len(self.prompt_logprobs) - 1  # positions scored so far
        if start > known:
            # NOTE: cannot happen (a sequence that wants them never starts from a cached prefix);
            # raised in the model runner, it fails this step rather than misalign the answer
            raise RuntimeError(f"prompt logprobs: a chunk at {start} would skip positions {known}..{start - 1}")
        return range(known, min(start + n, self.prompt_len - 1))

    def add_prompt_logprobs(self, first: int, lps: list[TokenLogprob]) -> None:
        """The logprobs of prompt tokens first, first + 1, ... (as prompt_rows_to_score asked for).
        NOTE: they replace, never append after, what entries `first`.. held, so a recomputed
        position can never shift the prompt's alignment."""
        if not self.wants_prompt_logprobs or not lps:
            return
        self.prompt_logprobs[first:] = lps
        if len(self.prompt_logprobs) >= self.prompt_len:
            self.wants_prompt_logprobs = False

    def take_prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        """The prompt's logprobs once, when complete (for the first delta that goes out)."""
        lps = self.prompt_logprobs
        if lps is None or self.wants_prompt_logprobs or self._prompt_sent:
            return None
        self._prompt_sent = True
        return lps

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def take_delta(self) -> str:
        """Text that can be shown now: everything, once finished; otherwise all but a tail that
        could still become the start of a stop string."""
        end = len(self.text)
        if not self.status.is_finished and self.stops is not None:
            end -= self.stops.held()
        end = max(end, self.sent)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
