"""Shared fixtures: one torch thread, offline hub, tiny random checkpoints built in tmp_path."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# NOTE: the tests' GGUF files would otherwise push the user's own entries out of the load cache
_OWN_LOAD_CACHE = None if "MISTRALRS_LOAD_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="mistralrs-load-")
if _OWN_LOAD_CACHE:
    os.environ["MISTRALRS_LOAD_CACHE_DIR"] = _OWN_LOAD_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_LOAD_CACHE:
        import shutil

        shutil.rmtree(_OWN_LOAD_CACHE, ignore_errors=True)


import torch  # noqa: E402

torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Hello world! How are you today? I am fine, thank you very much.",
    "def f(x):\n    return x * 2  # numbers 0123456789",
    "Ünïcödé: café, naïve, straße, 日本語, 中文, emoji 🙂",
]
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer trained on a tiny corpus; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHATML})
    )
    return tok.get_vocab_size()


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Saves a random-weight transformers model (safetensors) plus a tokenizer into `path`."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(path)
    kw = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=4,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    if arch == "mistral":
        kw.setdefault("sliding_window", 8)
    # NOTE: the architecture's own transformers classes: LlamaForCausalLM, Qwen3ForCausalLM...
    name = {
        "llama": "Llama",
        "mistral": "Mistral",
        "qwen2": "Qwen2",
        "qwen3": "Qwen3",
        "mixtral": "Mixtral",
        "qwen3_moe": "Qwen3Moe",
    }[arch]
    config = getattr(transformers, f"{name}Config")(**kw)
    model = getattr(transformers, f"{name}ForCausalLM")(config)
    # NOTE: random init is small (std 0.02); scale up so logits are not all ~equal and greedy paths differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # NOTE: transformers keeps a MoE layer's experts in 3-D tensors
                p.normal_(0, 0.15)
            elif arch in ("qwen2", "qwen3", "qwen3_moe") and p.dim() == 1:
                # NOTE: biases and norm weights away from their init (0 and 1), so a missing one shows
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_mistral"), "mistral")


@pytest.fixture(scope="session")
def no_template_model(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model with the chat template taken out of its tokenizer_config.json."""
    import shutil

    d = tmp_path_factory.mktemp("no_template")
    for f in tiny_llama.iterdir():
        shutil.copy(f, d / f.name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d
