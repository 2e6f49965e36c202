"""The Typer CLI through CliRunner: help at both levels, option mapping, one-line load errors."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from mistralrs_py import cli

runner = CliRunner()


@pytest.mark.parametrize(
    "args,expect",
    [
        (
            ["--help"],
            [
                "--port",
                "--host",
                "--log",
                "--truncate-sequence",
                "--max-seqs",
                "--device",
                "--dtype",
                "mistral",
                "gguf-mistral",
                "x-lora-mistral",
            ],
        ),
        (["mistral", "--help"], ["--model-id", "--revision", "--repeat-last-n"]),
        (
            ["gguf-mistral", "--help"],
            ["--quantized-model-id", "--quantized-filename", "--tok-model-id", "--repeat-last-n"],
        ),
        (["x-lora-mistral", "--help"], []),
    ],
)
def test_help(args, expect):
    r = runner.invoke(cli.app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    for word in expect:
        assert word in r.output


def test_options_map_to_spec(monkeypatch):
    seen = {}
    monkeypatch.setattr("mistralrs_py.server.launch.run_server", lambda opts, spec: seen.update(opts=opts, spec=spec))
    r = runner.invoke(
        cli.app,
        [
            "-p",
            "4321",
            "--truncate-sequence",
            "--max-seqs",
            "3",
            "--kv-cache-mb",
            "512",
            "--no-prefix-cache",
            "--block-size",
            "32",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "mistral",
            "-m",
            "some/model",
            "--revision",
            "v2",
            "--repeat-last-n",
            "16",
            "--isq",
            "Q4_K",
        ],
    )
    assert r.exit_code == 0, r.output
    o, s = seen["opts"], seen["spec"]
    assert (o.port, o.truncate_sequence, o.max_seqs, o.kv_cache_mb) == (4321, True, 3, 512)
    assert (o.prefix_caching, o.block_size) == (False, 32)
    eo = o.engine_options()
    assert (eo.prefix_caching, eo.block_size) == (False, 32)
    assert (s.model_id, s.revision, s.repeat_last_n, s.dtype, s.device) == ("some/model", "v2", 16, "float32", "cpu")
    assert s.isq == "q4_k"


def test_an_unknown_isq_type_is_a_usage_error():
    r = runner.invoke(cli.app, ["mistral", "--isq", "q3_k"])
    assert r.exit_code == 2 and "q4_0, q4_k, q8_0" in r.output


@pytest.mark.parametrize(
    "args", [["--dtype", "float8", "mistral"], ["--device", "tpu", "mistral"], ["--scheduler", "x", "mistral"]]
)
def test_bad_global_values(args):
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 2


def _load_error(args):
    r = runner.invoke(cli.app, ["--port", "0", "mistral", *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.output


def test_missing_directory(tmp_path):
    assert "does not exist" in _load_error(["-m", str(tmp_path / "nope")])


def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    out = _load_error(["-m", "someorg/some-model-that-is-not-cached"])
    assert "cannot be downloaded" in out or "not in the local Hugging Face cache" in out


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert "unsupported architecture" in _load_error(["-m", str(tmp_path)])


def test_pickle_only_directory_is_refused(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    assert "pickle" in _load_error(["-m", str(tmp_path)])


def test_hub_downloads_use_rich_progress(monkeypatch, tmp_path):
    """The hub path (no network here): snapshot_download gets the patterns and a rich tqdm."""
    import huggingface_hub

    from mistralrs_py.pipeline import hub

    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub.resolve("org/model", "v1") == tmp_path
    assert seen["repo_id"] == "org/model" and seen["revision"] == "v1"
    assert "*.safetensors" in seen["allow_patterns"] and not any(p.endswith(".bin") for p in seen["allow_patterns"])
    assert seen["tqdm_class"].__module__ == "tqdm.rich"


def test_max_model_len_beyond_the_model_is_capped_with_a_warning(tiny_llama, caplog):
    import torch

    from mistralrs_py.pipeline.base import ModelSpec
    from mistralrs_py.pipeline.hf import load_safetensors_dir

    with caplog.at_level("WARNING"):
        pipe = load_safetensors_dir(
            tiny_llama, ModelSpec(model_id=str(tiny_llama), max_model_len=100000), torch.device("cpu"), torch.float32
        )
    assert pipe.max_model_len == 256
    assert any("more than this model's context" in r.getMessage() for r in caplog.records)


def test_a_file_named_safetensors_that_is_not_one_is_a_one_line_error(tiny_llama, tmp_path):
    import shutil
    import subprocess
    import sys

    d = tmp_path / "broken"
    shutil.copytree(tiny_llama, d)
    (d / "model.safetensors").write_text("<html>404 Not Found</html>")  # what a failed download leaves
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mistralrs_py", "--port", "0", "mistral", "-m", str(d)],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "is not a valid safetensors file" in out.stderr and "Traceback" not in out.stderr


def test_tensor_parallel_size_reaches_the_spec_and_torchrun_sets_it(monkeypatch):
    seen = {}
    monkeypatch.setattr("mistralrs_py.server.launch.run_server", lambda opts, spec: seen.update(spec=spec))
    r = runner.invoke(cli.app, ["--tensor-parallel-size", "2", "gguf-mistral"])
    assert r.exit_code == 0, r.output
    assert (seen["spec"].tp_size, seen["spec"].tp_rank) == (2, 0)
    # NOTE: under torchrun (rank 0 here) the world size is the default
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    r = runner.invoke(cli.app, ["mistral"])
    assert r.exit_code == 0 and seen["spec"].tp_size == 3
    r = runner.invoke(cli.app, ["--tp", "2", "mistral"])
    assert r.exit_code == 2 and "torchrun's world size 3" in r.output


@pytest.mark.parametrize(
    "args,what",
    [
        (["--tp", "2", "x-lora-mistral", "-x", "somewhere"], "x-lora-mistral"),
        (["--tp", "2", "--compile", "mistral"], "--compile"),
        (["--tp", "2", "--perplexity", __file__, "mistral"], "--perplexity"),
    ],
)
def test_what_tensor_parallelism_does_not_run_is_refused(args, what):
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 2, r.output
    assert what in r.output and "does not work with" in r.output
