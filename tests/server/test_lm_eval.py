"""lm-evaluation-harness's `local-completions` model against a real server: a multiple-choice task and
a loglikelihood_rolling task on a small dataset written here, checked against transformers (float32,
the same weights) doing the same arithmetic."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.server.conftest import running_server

MC = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Rome"], "label": 0},
    {"question": "Two plus two equals", "choices": ["three", "four", "five"], "label": 1},
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
]
ROLL = [
    {"text": "The quick brown fox jumps over the lazy dog. Paris is the capital of France."},
    {"text": "Hello world! How are you today? I am fine, thank you very much."},
]


def write_tasks(d):
    (d / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in MC))
    (d / "roll.jsonl").write_text("\n".join(json.dumps(x) for x in ROLL))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(d / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n"
    )
    (d / "tiny_roll.yaml").write_text(
        "task: tiny_roll\n" + common.format(d / "roll.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
    )


def test_lm_eval_multiple_choice_and_rolling_perplexity(tiny_llama, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    from transformers import AutoModelForCausalLM

    from mistralrs_py.pipeline.tokenizer import load_hf_tokenizer

    write_tasks(tmp_path)
    with running_server(["--max-model-len", "256", "--dtype", "float32"], ["mistral", "-m", str(tiny_llama)]) as srv:
        cmd = [
            sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", f"base_url={srv.url}/v1/completions,model=default,tokenizer_backend=remote,num_concurrent=1,max_retries=1",
            "--tasks", "tiny_mc,tiny_roll", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
        ]  # fmt: skip
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results] = list((tmp_path / "out").rglob("results*.json"))
    got = json.loads(results.read_text())["results"]

    # the same arithmetic on transformers' float32 logits
    tok = load_hf_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    def loglikelihood(context: str, continuation: str) -> float:
        whole = tok.encode(context + continuation, add_special_tokens=False)
        ctx = tok.encode(context, add_special_tokens=False)
        lp = logprobs(whole)
        return sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))

    correct = [
        max(range(len(d["choices"])), key=lambda i: loglikelihood(d["question"], " " + d["choices"][i])) == d["label"]
        for d in MC
    ]
    assert got["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(MC))

    total, words = 0.0, 0
    for d in ROLL:
        # NOTE: lm-eval scores a rolling document after a prefix token (BOS, else EOS), in one window here
        ids = tok.encode(d["text"], add_special_tokens=False)
        lp = logprobs([tok.bos_id or tok.eos_ids[0], *ids])
        total += sum(float(lp[i, ids[i]]) for i in range(len(ids)))
        words += len(re.split(r"\s+", d["text"]))
    assert got["tiny_roll"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-3)
