"""The ordering format: generation (PEFT's numbering), the shipped templates, and the one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mistralrs_py import cli
from mistralrs_py.lora.ordering import (
    LEAF_NAMES,
    Ordering,
    OrderingError,
    check_layers,
    load_ordering,
    make_ordering,
    module_paths,
    parse_ordering,
    resolve_order,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "ordering_templates"


def test_indices_follow_peft_layer_numbers(tiny_llama):
    """PEFT numbers the LoRA-wrapped linears in module registration order; so does make_ordering."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners import lora
    from transformers import AutoModelForCausalLM

    targets = ["v_proj", "q_proj", "down_proj", "o_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=targets))
    peft_order = [
        name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, lora.Linear)
    ]
    o = make_ordering(model.config.num_hidden_layers, ["a", "b"], targets)
    assert list(o.layers) == peft_order and list(o.layers.values()) == list(range(len(peft_order)))
    assert o.order == ["a", "b"]


def test_templates_are_what_the_generator_writes():
    names = sorted(p.stem for p in TEMPLATES.glob("*.json"))
    assert {"mistral-7b", "llama-2-7b", "llama-3-8b", "smollm2-135m"} <= set(names)
    for p in TEMPLATES.glob("*.json"):
        data = json.loads(p.read_text())
        layers = 1 + max(int(re.match(r"model\.layers\.(\d+)\.", k).group(1)) for k in data["layers"])
        targets = {k.rsplit(".", 1)[1] for k in data["layers"]}
        assert data == json.loads(make_ordering(layers, [], targets).to_json()), p.name
    mistral = json.loads((TEMPLATES / "mistral-7b.json").read_text())["layers"]
    # mistral.rs's xlora-orderings/mistral-ordering.json: 32 layers x q,k,v,o,gate, index 5*layer + j
    assert len(mistral) == 160 and mistral["model.layers.7.mlp.gate_proj"] == 39
    assert mistral["model.layers.31.self_attn.k_proj"] == 156


def test_ordering_cli(tmp_path):
    out = tmp_path / "o.json"
    r = CliRunner().invoke(
        cli.app, ["ordering", "--num-layers", "3", "-a", "x,y", "-t", "q_proj,down_proj", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    o = load_ordering(out)
    assert o.order == ["x", "y"] and o.layers == make_ordering(3, ["x", "y"], ["q_proj", "down_proj"]).layers
    r = CliRunner().invoke(cli.app, ["ordering", "--num-layers", "2", "-t", "lm_head"])
    assert r.exit_code == 2 and "unsupported target module 'lm_head'" in r.output and "Traceback" not in r.output


def test_ordering_cli_reads_the_layer_count_of_a_model(tiny_mistral):
    r = CliRunner().invoke(cli.app, ["ordering", "-m", str(tiny_mistral), "-a", "a"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["layers"] == make_ordering(2, ["a"]).layers


WRAPPED = module_paths(2, ["q_proj", "v_proj"])


@pytest.mark.parametrize(
    "layers,msg",
    [
        ({**{w: i for i, w in enumerate(WRAPPED)}, "model.layers.2.self_attn.q_proj": 9}, "the model has 2 layers"),
        ({w: i for i, w in enumerate(WRAPPED[:-1])}, "has no index for model.layers.1.self_attn.v_proj"),
        ({w: i + 1 for i, w in enumerate(WRAPPED)}, "has layer index 4, but the adapters wrap 4 linears"),
        ({w: i // 2 for i, w in enumerate(WRAPPED)}, "share layer index 0"),
        ({"model.layers.0.self_attn.q_proj.lora_A": 0}, "not a LoRA-able linear"),
    ],
)
def test_layer_map_errors(layers, msg):
    with pytest.raises(OrderingError, match=re.escape(msg)) as e:
        check_layers(Ordering([], layers), WRAPPED, 2)
    assert "\n" not in str(e.value)


def test_extra_keys_for_unwrapped_modules_are_ignored():
    layers = make_ordering(2).layers  # all seven projections; only q and v are wrapped
    sub = {w: i for i, w in enumerate(WRAPPED)}
    assert check_layers(Ordering([], {**layers, **sub}), WRAPPED, 2) == [0, 1, 2, 3]


def test_order_resolution():
    assert resolve_order(Ordering([], {}), ["b", "a"], ["a", "b", "c"]) == ["b", "a"]
    assert resolve_order(Ordering(["a", "c"], {}), None, ["a", "b", "c"]) == ["a", "c"]
    with pytest.raises(OrderingError, match="unknown adapter 'z'"):
        resolve_order(Ordering(["a", "z"], {}), ["a", "b"], ["a", "b"])
    with pytest.raises(OrderingError, match="unknown adapter 'z'.*no folder z/"):
        resolve_order(Ordering(["a", "z"], {}), None, ["a", "b"])
    with pytest.raises(OrderingError, match="differs from the training order"):
        resolve_order(Ordering(["b", "a"], {}), ["a", "b"], ["a", "b"])
    with pytest.raises(OrderingError, match="`order` is empty"):
        resolve_order(Ordering([], {}), None, ["a"])


@pytest.mark.parametrize(
    "text,msg",
    [
        ("{", "not valid JSON"),
        ('{"order": "a", "layers": {"x": 0}}', "`order` must be a list"),
        ('{"order": ["a", "a"], "layers": {"x": 0}}', "names an adapter twice"),
        ('{"order": ["a"]}', "`layers` must map"),
        ('{"order": ["a"], "layers": {"x": -1}}', "not a non-negative integer"),
    ],
)
def test_malformed_files(tmp_path, text, msg):
    p = tmp_path / "o.json"
    p.write_text(text)
    with pytest.raises(OrderingError, match=re.escape(msg)):
        load_ordering(p)
    with pytest.raises(OrderingError, match="does not exist"):
        load_ordering(tmp_path / "missing.json")


def test_parse_accepts_missing_order():
    assert parse_ordering({"layers": {"model.layers.0.self_attn.q_proj": 0}}).order == []
    assert LEAF_NAMES[0] == "q_proj" and LEAF_NAMES[-1] == "down_proj"
