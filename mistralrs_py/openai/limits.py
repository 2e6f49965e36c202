"""How large an answer one request may ask for.

An answer's logprobs grow as (sequences) x (tokens with logprobs) x (alternatives + 1): echo with
`logprobs: 20` over a 2,215-token prompt with n=128 is about 6 million entries, a 168 MB response,
and costs no generation at all (max_tokens 0). So, as OpenAI bounds `n` and `logprobs`, a request
may ask for at most MAX_LOGPROB_ENTRIES logprob entries (each one token's logprob or one of its
alternatives: some 20 to 60 bytes of JSON, so at most a few tens of MB), counted before anything runs:

    n x prompts x (prompt tokens x (prompt alternatives + 1), when the prompt's logprobs are asked for
                   + max_tokens x (top_logprobs + 1), when the output's logprobs are asked for)

where max_tokens, when the request leaves it out, is the room the context leaves after the prompt.
Past that the request is refused with a 400 naming the parameter that weighs most.

An answer under the bound can still take seconds to assemble and encode: the server builds it off
its event loop (server/answers.py).
"""

from __future__ import annotations

from ..engine.request import SamplingParams
from . import protocol as P

MAX_LOGPROB_ENTRIES = 1_000_000


def logprob_entries(prompts: list[list[int]], params: SamplingParams, max_len: int) -> tuple[int, int]:
    """-> (the prompts' entries, the outputs' entries) an answer may hold, every choice counted."""
    prompt = output = 0
    for ids in prompts:
        if params.prompt_logprobs is not None:
            prompt += params.n * len(ids) * (params.prompt_logprobs + 1)
        if params.logprobs:
            room = max(max_len - len(ids), 0)
            generated = min(params.max_tokens, room) if params.max_tokens is not None else room
            output += params.n * generated * (params.top_logprobs + 1)
    return prompt, output


def check_answer_size(
    prompts: list[list[int]], params: SamplingParams, max_len: int, prompt_param: str, output_param: str
) -> None:
    """Refuses (InvalidRequest, 400) a request whose answer could hold more than MAX_LOGPROB_ENTRIES
    logprob entries; `prompt_param` and `output_param` are the request's names for the prompt's and
    the output's logprobs, the one that weighs most is named."""
    prompt, output = logprob_entries(prompts, params, max_len)
    total = prompt + output
    if total <= MAX_LOGPROB_ENTRIES:
        return
    param = prompt_param if prompt >= output else output_param
    raise P.InvalidRequest(
        f"this request asks for up to {total:,} logprob entries (n={params.n} x {len(prompts)} prompt(s) x "
        f"(prompt tokens x (prompt logprobs + 1) + max_tokens x (top logprobs + 1))); one answer may hold at "
        f"most {MAX_LOGPROB_ENTRIES:,}: lower {param}, n or max_tokens",
        param,
    )


def check_chat(req: P.ChatCompletionRequest, ids: list[int], params: SamplingParams, max_len: int) -> None:
    check_answer_size([ids], params, max_len, "prompt_logprobs", "top_logprobs" if req.top_logprobs else "logprobs")


def check_completion(req: P.CompletionRequest, prompts: list[list[int]], params: SamplingParams, max_len: int) -> None:
    # NOTE: echo with logprobs reports the prompt's logprobs under `logprobs`; vLLM's field under its
    # own name; with both, the engine computes the larger number of alternatives
    echoed = req.logprobs if req.echo and req.logprobs is not None else -1
    asked = req.prompt_logprobs if req.prompt_logprobs is not None else -1
    prompt_param = "prompt_logprobs" if asked > echoed else "logprobs"
    check_answer_size(prompts, params, max_len, prompt_param, "logprobs")
