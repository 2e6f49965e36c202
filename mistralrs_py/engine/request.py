"""What the server hands the engine (Request, SamplingParams) and what it gets back (events). No torch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Union

from .stops import StopStrings

if TYPE_CHECKING:
    from .grammar import Grammar


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # over the last `repeat_last_n` tokens of prompt + output
    repeat_last_n: int = 64
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = None  # None: until the context is full; 0: the prompt alone (its logprobs)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    skip_special_tokens: bool = True
    # the prompt's own logprobs (echo with logprobs, vLLM's prompt_logprobs): None off, else the
    # alternatives per position; computed in float32 in the prefill that serves the request
    prompt_logprobs: int | None = None
    # the output's grammar (compiled from response_format, a tool choice...): every choice follows it
    grammar: Optional["Grammar"] = field(default=None, compare=False)
    # NOTE: the stop strings' matching tables, built once here (on the thread that prepares the
    # request, not the engine's) and shared by the request's sequences
    stop_strings: Optional[StopStrings] = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", StopStrings(self.stop) if self.stop else None)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New output of choice `index`: text that is safe to show (never part of a stop string)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    # the prompt's logprobs, on the first delta of the choice that computed them (the first
    # prompt token has none: None)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Done:
    index: int
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    stop_reason: Union[str, int, None] = None  # the stop string or token id that ended it
    extra: Optional[dict] = None  # pipeline-specific report (X-LoRA scalings)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed again)


@dataclass
class Error:
    message: str
    code: str = "server_error"
    index: int | None = None


Event = Union[Delta, Done, Error]


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the engine thread; must not block
    arrival: float = field(default_factory=time.monotonic)
