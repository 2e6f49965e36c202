"""A scripted pipeline for engine and scheduler tests: no weights, a step in microseconds.

The "model" caches each token id in the KV pool (one layer, one head of one value) at the block and
offset the step writes, and the logits of a row peak at a token that is a hash of everything cached
for that row's sequence up to its position, read through its block table. So the next token depends
on the whole sequence *as the engine cached it*: a wrong block table, position, shared prefix or a
lost recompute after preemption changes the output, while a correct engine gives every sequence the
same tokens whether it runs alone or batched, from a cold cache or a cached prefix.
"""

from __future__ import annotations

import threading

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import Delta, Done, Error, Request
from mistralrs_py.models.config import ModelConfig
from mistralrs_py.pipeline.base import Pipeline
from mistralrs_py.pipeline.tokenizer import Tokenizer

EOS = 0
WORDS = [
    "<eos>",
    "<unk>",
    *[chr(c) for c in range(ord("a"), ord("z") + 1)],
    *[str(d) for d in range(10)],
    "hello",
    "world",
    "stop",
    "STOP",
]
VOCAB = len(WORDS)


def fake_tokenizer() -> Tokenizer:
    """A real `tokenizers` WordLevel tokenizer over WORDS: text is the words joined by spaces."""
    backend = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(["<eos>"])
    return Tokenizer(backend, bos_token=None, eos_token="<eos>", chat_template=None, add_bos=False)


def next_token(tokens: list[int]) -> int:
    """The scripted model's favourite next token after `tokens` (never EOS)."""
    h = 0
    for i, t in enumerate(tokens):
        h = (h * 31 + (t + 1) * (i + 7)) % 1_000_003
    return 2 + h % (VOCAB - 2)


class FakePipeline(Pipeline):
    """forward() -> logits [rows, V]: `peak` at next_token(cached tokens) and a smooth slope around it
    (so temperature sampling has a real distribution). Records slot begin/end calls and can fail."""

    def __init__(self, max_model_len: int = 64, peak: float = 8.0):
        cfg = ModelConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=1,
            max_position_embeddings=max_model_len,
        )
        super().__init__(
            name="fake",
            config=cfg,
            model=None,
            tokenizer=fake_tokenizer(),
            dtype=torch.float32,
            device=torch.device("cpu"),
            max_model_len=max_model_len,
            summary={"format": "fake"},
        )
        self.peak = peak
        self.fail_on: int | None = None  # a token id whose presence in a step makes forward raise
        self.begun: list[int] = []
        self.ended: list[int] = []
        self.steps = 0

    def begin_slot(self, slot: int, tokens=None, cached_blocks=()) -> None:
        self.begun.append(slot)

    def end_slot(self, slot: int) -> dict | None:
        self.ended.append(slot)
        return {"fake_report": slot}

    @torch.inference_mode()
    def forward(self, input_ids, view, cache):
        self.steps += 1
        if self.fail_on is not None and bool((input_ids == self.fail_on).any()):
            raise RuntimeError("injected forward fault")
        k, bs = cache.k[0], view.block_size  # [blocks, 1, bs, 1]
        k[view.write_blocks, 0, view.write_offsets, 0] = input_ids.float()
        tables = [view.decode_tables[r].tolist() for r in range(view.num_decode)]
        for seg in view.prefills:
            tables += [seg.blocks.tolist()] * (seg.end_row - seg.start_row)
        rows = []
        for r in view.logit_rows.tolist():
            pos, table = int(view.positions[r]), tables[r]
            tokens = [int(k[table[j // bs], 0, j % bs, 0]) for j in range(pos + 1)]
            best = next_token(tokens)
            dist = (torch.arange(VOCAB) - best).abs().float()
            rows.append(self.peak - dist * 0.5)
        return torch.stack(rows) if rows else torch.empty(0, VOCAB)


def expected(prompt: list[int], n: int) -> list[int]:
    """The greedy output of `n` tokens, computed without the engine."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def make_engine(pipe: FakePipeline | None = None, **kw) -> Engine:
    kw.setdefault("kv_cache_mb", 1.0)
    return Engine(pipe or FakePipeline(), **kw)


# prompts inside the fake vocabulary: short, long (several prefill chunks of 8), repetitive, mid
PROMPTS = [[5, 9, 14], [(3 + 5 * i) % (VOCAB - 2) + 2 for i in range(23)], [7] * 11, list(range(30, 36))]


class Collector:
    """The emit callback of one request: keeps its events; `done` is set once every choice ended."""

    def __init__(self, n: int = 1):
        self.events, self.done = [], threading.Event()
        self.n_done, self.n = 0, n

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, (Done, Error)):
            self.n_done += 1
            if self.n_done >= self.n or isinstance(ev, Error):
                self.done.set()

    def tokens(self, index=0):
        return [t for e in self.events if isinstance(e, Delta) and e.index == index for t in e.token_ids]

    def text(self, index=0):
        return "".join(e.text for e in self.events if isinstance(e, Delta) and e.index == index)

    def final(self, index=0):
        return next(e for e in self.events if isinstance(e, Done) and e.index == index)

    def errors(self):
        return [e for e in self.events if isinstance(e, Error)]


def run(engine, prompts, params_list, timeout: float = 60):
    """Submits every request, waits for all of them; their collectors in order."""
    cols = []
    for i, (p, params) in enumerate(zip(prompts, params_list)):
        c = Collector(params.n)
        cols.append(c)
        engine.add_request(Request(f"r{i}", p, params, c))
    for c in cols:
        assert c.done.wait(timeout), "request did not finish"
    return cols
