"""Build a ``tokenizers.Tokenizer`` from the tokenizer metadata of a GGUF file.

A GGUF carries no ``tokenizer.json``: the vocabulary, merges/scores, token types and special ids
are stored under llama.cpp's ``tokenizer.*`` keys.  This module turns those into a Hugging Face
``tokenizers.Tokenizer`` that gives the ids llama.cpp gives (with ``parse_special=true``), which
for normal text are also the ids of transformers' ``AutoTokenizer.from_pretrained(.., gguf_file=..)``.

Supported ``tokenizer.ggml.model`` values:

* ``"gpt2"``  byte-level BPE with merges; the split regex(es) come from ``tokenizer.ggml.pre``
  (see ``_PRE_TOKENIZERS``); an unknown pre-tokenizer name raises ``ValueError``.
* ``"llama"`` SentencePiece BPE: merge priority from ``tokenizer.ggml.scores``, ``<0xNN>`` byte
  fallback, spaces escaped as U+2581, optional dummy prefix (``tokenizer.ggml.add_space_prefix``).

The returned tokenizer never adds BOS/EOS itself (no post-processor): callers prepend
``bos_token_id`` when ``add_bos_token`` is true.  Control (3), unknown (2) and user-defined (4)
tokens, and the bos/eos/unk/pad tokens, are added tokens, so "<|im_start|>" in a rendered chat
template encodes to its single id; control/unknown/bos/eos/unk/pad ones are ``special`` (dropped by
``decode(skip_special_tokens=True)``), user-defined ones are not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# llama.cpp's LLAMA_TOKEN_TYPE_* values as stored in tokenizer.ggml.token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"

# Split regexes per tokenizer.ggml.pre.  Several regexes are applied one after the other, each
# splitting the pieces of the previous one and keeping matched and unmatched text as separate
# pieces -- llama.cpp's unicode_regex_split, i.e. a Sequence of Split(behavior="isolated").
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# NOTE: llama.cpp spells the contractions as '[sS]|'[tT]... because its regex engine lacks (?i:);
# we keep the models' original (?i:...) (as transformers does).  They differ only for non-ASCII
# case variants such as "'\u017f" (long s), which llama.cpp does not treat as a contraction.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# name -> (regexes, ignore_merges, llama.cpp's add_bos default when tokenizer.ggml.add_bos_token is absent)
_PRE_GROUPS = [
    # NOTE: "default" (also used when tokenizer.ggml.pre is missing) is llama.cpp's legacy
    # fallback, not plain GPT-2: punctuation runs and 3-digit groups are split off as well.
    (("default",), ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False, False)),
    (("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), ([_GPT2], False, False)),
    # NOTE: these vocabularies were trained with individual digits (HF pre-tokenizer Digits +
    # ByteLevel); transformers' GGUF loader forgets the digit split, llama.cpp keeps it.
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        ([r"\p{N}", _GPT2], False, False),
    ),
    (("falcon",), ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False, False)),
    # NOTE: Llama-3-style vocabularies set ignore_merges (a pre-token that is itself in the vocab is
    # emitted whole) and llama.cpp adds BOS for them by default.
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        ([_LLAMA3], True, True),
    ),
    (("dbrx", "smaug-bpe"), ([_LLAMA3], False, False)),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "kormo", "f2llmv2"), ([_QWEN2], False, False)),
    (("tekken",), ([_TEKKEN], True, True)),
    (("gpt-4o", "llama4", "kanana2", "minimax-m2"), ([_GPT4O], False, False)),
]
_PRE_TOKENIZERS = {name: spec for names, spec in _PRE_GROUPS for name in names}
# pre-tokenizers for which llama.cpp turns clean_spaces off (the others keep its BPE default: on)
_NO_CLEAN_SPACES = {
    "command-r",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "tekken",
    "smollm",
    "gpt-4o",
    "llama4",
    "kanana2",
    "minimax-m2",
}


@dataclass
class GGUFTokenizerInfo:
    tokenizer: tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool  # prepend BOS when encoding a prompt (the tokenizer itself never does)
    chat_template: str | None
    # NOTE: llama.cpp's detokenizer "cleans" " ." / " ," / " 's" etc. for most byte-level
    # vocabularies (not smollm/qwen2/tekken/...); a tokenizers decoder cannot express that, so
    # it is reported here for callers that want to apply it and is NOT applied by `tokenizer`.
    clean_up_tokenization_spaces: bool = False


def read_gguf_fields(reader: "gguf.GGUFReader") -> dict[str, object]:
    """Every field of a ``gguf.GGUFReader`` as plain Python values (str, int, float, bool, lists)."""
    from gguf import GGUFValueType

    def text(part) -> str:
        # NOTE: llama.cpp keeps token bytes as they are; invalid UTF-8 (very rare) becomes U+FFFD here.
        return part.tobytes().decode("utf-8", errors="replace")

    out: dict[str, object] = {}
    for name, field in reader.fields.items():
        kinds = field.types
        if not kinds:
            out[name] = None
        elif kinds[0] == GGUFValueType.ARRAY and len(kinds) == 2:
            if kinds[1] == GGUFValueType.STRING:
                out[name] = [text(field.parts[i]) for i in field.data]
            else:
                parts = [field.parts[i] for i in field.data]
                out[name] = np.concatenate(parts).tolist() if parts else []
        elif kinds[0] == GGUFValueType.ARRAY:  # nested arrays: rare, let gguf do its best
            out[name] = field.contents()
        elif kinds[0] == GGUFValueType.STRING:
            out[name] = text(field.parts[-1])
        else:
            out[name] = field.parts[-1].tolist()[0]
    return out


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]):
    """SentencePiece BPE as BPE merges: every split (left, right) of every token whose halves are
    both tokens becomes a merge, ranked by the score of the merged token (higher first).

    NOTE: llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose concatenation is a
    token with the highest score (leftmost on ties); ranking all such pairs by that score makes
    HF's rank-ordered BPE do the same.  Ties between different tokens are ordered by token id.
    """
    ranked = []
    for token_id, token in enumerate(tokens):
        if vocab.get(token) != token_id:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _file_merges(fields, vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for merge in fields.get("tokenizer.ggml.merges") or []:
        cut = merge.find(" ", 1)  # NOTE: as llama.cpp: the separator is the first space after char 0
        left, right = merge[:cut], merge[cut + 1 :]
        # NOTE: tokenizers rejects merges of/into unknown tokens; llama.cpp could never emit them whole
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    return merges


def tokenizer_from_gguf(fields: Mapping[str, object]) -> GGUFTokenizerInfo:
    """Build the tokenizer described by GGUF metadata ``fields`` (plain values keyed by GGUF key)."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"unsupported GGUF tokenizer.ggml.model {kind!r} (supported: 'gpt2', 'llama')")
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
    n = len(tokens)
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * n)
    # NOTE: llama.cpp renames empty tokens so that they cannot match anything.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    # NOTE: on duplicate strings llama.cpp's text->id map keeps the last id; so do we.
    vocab = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str, default: int | None) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}")
        value = default if value is None else int(value)
        return value if value is not None and 0 <= value < n else None

    # NOTE: llama.cpp defaults SPM vocabularies to bos=1, eos=2, unk=0 when the keys are absent;
    # its BPE default (id 11, a Falcon leftover) is not reproduced: absent means None.
    spm = kind == "llama"
    bos_id = special_id("bos_token_id", 1 if spm else None)
    eos_id = special_id("eos_token_id", 2 if spm else None)
    unk_id = special_id("unknown_token_id", 0 if spm else None)
    pad_id = special_id("padding_token_id", None)
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731

    if spm:
        add_bos_default, clean_spaces = True, False
        tok = _spm_tokenizer(fields, tokens, vocab, name(unk_id))
    else:
        pre = fields.get("tokenizer.ggml.pre") or "default"
        if not fields.get("tokenizer.ggml.pre"):
            logger.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF tokenizer.ggml.pre {pre!r} for tokenizer.ggml.model 'gpt2'")
        regexes, ignore_merges, add_bos_default = _PRE_TOKENIZERS[pre]
        clean_spaces = pre not in _NO_CLEAN_SPACES
        merges = _file_merges(fields, vocab)
        tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
    _add_special_tokens(tok, fields, tokens, types, {bos_id, eos_id, unk_id, pad_id} - {None})

    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    return GGUFTokenizerInfo(
        tokenizer=tok,
        bos_token=name(bos_id),
        eos_token=name(eos_id),
        unk_token=name(unk_id),
        pad_token=name(pad_id),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        add_bos_token=bool(add_bos_default if add_bos is None else add_bos) and bos_id is not None,
        chat_template=fields.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=clean_spaces,
    )


def _spm_tokenizer(fields, tokens, vocab, unk_token) -> tokenizers.Tokenizer:
    scores = [float(s) for s in fields.get("tokenizer.ggml.scores") or []]
    # NOTE: llama.cpp's SPM tokenizer only looks at scores.  Files converted from a HF BPE
    # tokenizer (gguf-py's LlamaHfVocab) store one placeholder score for every token plus real
    # merges; there (or with no scores at all) the merges are used, as transformers does.
    if fields.get("tokenizer.ggml.merges") and len(set(scores)) <= 1:
        merges = _file_merges(fields, vocab)
    else:
        merges = _merges_from_scores(tokens, scores or [0.0] * len(tokens), vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    add_space_prefix = fields.get("tokenizer.ggml.add_space_prefix")
    add_space_prefix = True if add_space_prefix is None else bool(add_space_prefix)
    # NOTE: llama.cpp prefixes a space to every text fragment that starts the input or follows a
    # special/user-defined token, then escapes all spaces as U+2581 (so " hi" -> "▁▁hi", like
    # sentencepiece).  A normalizer does exactly that: tokenizers splits on added tokens first and
    # normalizes each remaining fragment.  (A Metaspace pre-tokenizer, as transformers uses, would
    # not double the prefix before a leading space and, with prepend_scheme="first", would not add
    # it after special tokens.)
    steps = [normalizers.Replace(" ", SPIECE_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    decode = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # NOTE: drop the dummy prefix again (one leading space of the text)
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok


def _add_special_tokens(tok, fields, tokens, types, named_ids) -> None:
    # NOTE: llama.cpp gives Phi-3 models (by general.name) rstrip on their special tokens, as the
    # original tokenizer.json does; it is the only per-model attribute rule relevant to chat models.
    model_name = str(fields.get("general.name") or "").lower()
    phi3 = "phi-3" in model_name or "phi3" in model_name
    special, user = [], []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, UNKNOWN) or i in named_ids:
            rstrip = phi3 and (kind != NORMAL or token == "</s>") and token not in ("<unk>", "<s>", "<|endoftext|>")
            special.append(AddedToken(token, special=True, normalized=False, rstrip=rstrip))
        elif kind == USER_DEFINED:
            # NOTE: stored as raw text (not byte-level spelled); llama.cpp always matches them whole.
            user.append(AddedToken(token, special=False, normalized=False, rstrip=phi3))
    tok.add_special_tokens(special)
    tok.add_tokens(user)
