"""The X-LoRA ordering file: which adapter is class i of the classifier, and which scalings row
(the "X-LoRA layer index") each LoRA-wrapped linear reads.

    {"order": ["adapter_1", "adapter_2"],
     "layers": {"model.layers.0.self_attn.q_proj": 0, "model.layers.0.self_attn.k_proj": 1, ...}}

`layers` uses Hugging Face module paths. Indices follow the module registration order of the HF
model, counting only wrapped linears: per decoder layer q, k, v, o, then gate, up, down (PEFT's
`convert_layers_to_xlora` and mistral.rs number them the same way).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# NOTE: registration order inside one decoder layer of transformers' Llama/Mistral.
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LEAF_NAMES = tuple(p.split(".")[1] for p in PROJECTIONS)
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")


class OrderingError(ValueError):
    """A malformed or mismatched ordering; str() is one line naming the problem and the fix."""


@dataclass
class Ordering:
    order: list[str] = field(default_factory=list)  # adapter names, class index = position
    layers: dict[str, int] = field(default_factory=dict)  # HF module path -> X-LoRA layer index

    def to_json(self) -> str:
        return json.dumps({"order": self.order, "layers": self.layers}, indent=2) + "\n"


def module_paths(num_layers: int, target_modules) -> list[str]:
    """HF paths of the wrapped linears in registration order."""
    targets = set(target_modules)
    unknown = sorted(targets - set(LEAF_NAMES))
    if unknown:
        raise OrderingError(
            f"unsupported target module {unknown[0]!r}; X-LoRA adapters may target {', '.join(LEAF_NAMES)}"
        )
    return [f"model.layers.{i}.{p}" for i in range(num_layers) for p in PROJECTIONS if p.split(".")[1] in targets]


def make_ordering(num_layers: int, adapters=(), target_modules=LEAF_NAMES) -> Ordering:
    """The ordering PEFT and mistral.rs imply for a model with `num_layers` decoder layers."""
    names = list(adapters)
    if len(set(names)) != len(names):
        raise OrderingError(f"adapter names repeat: {', '.join(names)}")
    return Ordering(names, {p: i for i, p in enumerate(module_paths(num_layers, target_modules))})


def parse_ordering(data, source: str = "ordering") -> Ordering:
    if not isinstance(data, dict):
        raise OrderingError(f"{source}: expected a JSON object with `order` and `layers`")
    order = data.get("order")
    order = [] if order is None else order
    if not isinstance(order, list) or not all(isinstance(x, str) for x in order):
        raise OrderingError(f"{source}: `order` must be a list of adapter names")
    if len(set(order)) != len(order):
        raise OrderingError(f"{source}: `order` names an adapter twice")
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise OrderingError(
            f"{source}: `layers` must map module paths to X-LoRA layer indices; generate it with `mistralrs ordering`"
        )
    bad = [k for k, v in layers.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise OrderingError(f"{source}: layer index of {bad[0]} is {layers[bad[0]]!r}, not a non-negative integer")
    return Ordering(list(order), dict(layers))


def load_ordering(path: str | Path) -> Ordering:
    p = Path(path).expanduser()
    if not p.is_file():
        raise OrderingError(f"ordering file {path} does not exist; generate one with `mistralrs ordering`")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OrderingError(f"ordering file {path} is not valid JSON ({e})") from None
    return parse_ordering(data, str(path))


def check_layers(ordering: Ordering, wrapped: list[str], num_layers: int, source: str = "ordering") -> list[int]:
    """X-LoRA layer index of each wrapped module (HF paths, registration order).

    NOTE: stricter than mistral.rs, which panics on a missing module and indexes out of bounds on a
    too-large index: here the wrapped modules' indices must be exactly 0..L-1, and a key naming a
    module this model does not have (another architecture's template) is refused. Keys naming
    existing but unwrapped modules are ignored, as in mistral.rs."""
    fix = "generate a matching one with `mistralrs ordering`"
    for key in ordering.layers:
        m = _MODULE.match(key)
        if m is None:
            raise OrderingError(
                f"{source}: `layers` names {key!r}, which is not a LoRA-able linear of a "
                f"Llama/Mistral model (model.layers.N.self_attn.q_proj ...); {fix}"
            )
        if int(m.group(1)) >= num_layers:
            raise OrderingError(
                f"{source}: `layers` names {key}, but the model has {num_layers} layers: "
                f"the ordering was made for another model; {fix}"
            )
    missing = [w for w in wrapped if w not in ordering.layers]
    if missing:
        raise OrderingError(
            f"{source}: `layers` has no index for {missing[0]}"
            f"{f' and {len(missing) - 1} more wrapped modules' if len(missing) > 1 else ''}; {fix}"
        )
    idx = [ordering.layers[w] for w in wrapped]
    L = len(wrapped)
    over = [(w, i) for w, i in zip(wrapped, idx) if i >= L]
    if over:
        raise OrderingError(
            f"{source}: {over[0][0]} has layer index {over[0][1]}, but the adapters wrap {L} "
            f"linears (indices 0..{L - 1}); {fix}"
        )
    if len(set(idx)) != L:
        seen: dict[int, str] = {}
        for w, i in zip(wrapped, idx):
            if i in seen:
                raise OrderingError(f"{source}: {seen[i]} and {w} share layer index {i}; {fix}")
            seen[i] = w
    return idx


def resolve_order(
    ordering: Ordering, config_adapters: list[str] | None, available: list[str], source: str = "ordering"
) -> list[str]:
    """The adapter names in class order.

    `config_adapters`: the names in xlora_config.json's `adapters` (training order) or None;
    `available`: adapter folders found in the X-LoRA checkpoint."""
    order = ordering.order or list(config_adapters or [])
    if not order:
        raise OrderingError(
            f"{source}: `order` is empty and xlora_config.json lists no adapters; "
            "name them with `mistralrs ordering --adapters a,b,...`"
        )
    if config_adapters and ordering.order:
        unknown = [a for a in order if a not in config_adapters]
        if unknown:
            raise OrderingError(
                f"{source}: unknown adapter {unknown[0]!r}; xlora_config.json has {', '.join(config_adapters)}"
            )
        if order != list(config_adapters):
            raise OrderingError(
                f"{source}: `order` ({', '.join(order)}) differs from the training order in "
                f"xlora_config.json ({', '.join(config_adapters)}); class i of the classifier is "
                "the i-th adapter of training"
            )
    absent = [a for a in order if a not in available]
    if absent:
        have = ", ".join(sorted(available)) or "none"
        raise OrderingError(
            f"{source}: unknown adapter {absent[0]!r}: the X-LoRA checkpoint has no folder "
            f"{absent[0]}/ with adapter_config.json (found: {have})"
        )
    return order
