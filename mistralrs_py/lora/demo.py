"""A demo X-LoRA checkpoint for the embedded SmolLM2-135M-Instruct, built offline in about a second.

    python -m mistralrs_py.lora.demo OUT_DIR      # then: mistralrs x-lora-mistral -x OUT_DIR -o OUT_DIR/ordering.json

What it is: three *random* rank-8 LoRA experts ("expert_a", "expert_b", "expert_c") on all seven
projections of every layer, small enough that the model still writes fluent text, and a random
2-layer layerwise classifier (ReLU, hidden width 64) whose softmax mixes the experts differently
per token and per layer. It exercises every part of X-LoRA (both passes, per-token layerwise
scalings, the dual KV cache, the scalings report) but has learned nothing: use it to try the
server and to benchmark, not to judge quality. Files are written in the xlora package's layout,
the adapters as PEFT saves them (bfloat16, to also exercise the upcast).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .ordering import LEAF_NAMES, PROJECTIONS, make_ordering

# NOTE: the embedded model's shapes (its GGUF metadata); a mismatch is a clear load error.
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_layers": 30,
    "num_heads": 9,
    "num_kv_heads": 3,
    "head_dim": 64,
}
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTERS = ("expert_a", "expert_b", "expert_c")


def _shapes(dims: dict) -> dict[str, tuple[int, int]]:
    h, i = dims["hidden_size"], dims["intermediate_size"]
    q, kv = dims["num_heads"] * dims["head_dim"], dims["num_kv_heads"] * dims["head_dim"]
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }  # (out, in)


def build_demo(out_dir: str | Path, dims: dict = SMOLLM2_135M, adapters=ADAPTERS, rank: int = 8, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shapes = _shapes(dims)
    alpha = 2 * rank
    for name in adapters:
        tensors = {}
        for layer in range(dims["num_layers"]):
            for proj in PROJECTIONS:
                o, i = shapes[proj.split(".")[1]]
                key = f"base_model.model.model.layers.{layer}.{proj}"
                # NOTE: with A ~ N(0, 1/in) and B ~ N(0, 3e-3) each expert moves a layer's output by
                # ~2% of its input's rms: greedy text changes, yet stays fluent (tried 1e-3..1e-2).
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, i, generator=g) / i**0.5).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 3e-3).to(torch.bfloat16)
        folder = out / name
        folder.mkdir(exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": BASE_NAME,
                    "r": rank,
                    "lora_alpha": alpha,
                    "lora_dropout": 0.0,
                    "target_modules": list(LEAF_NAMES),
                    "bias": "none",
                    "use_rslora": False,
                    "fan_in_fan_out": False,
                },
                indent=2,
            )
            + "\n"
        )
    n, L, size, h = len(adapters), dims["num_layers"] * len(PROJECTIONS), 64, dims["hidden_size"]
    # NOTE: the final-norm hidden state has entries of order 1-10; these weights give logits of
    # order 1, so the softmax mixes the experts rather than picking one.
    save_file(
        {
            "inner.0.weight": torch.randn(size, h, generator=g) * 0.3 / h**0.5,
            "inner.0.bias": torch.zeros(size),
            "last.weight": torch.randn(L * n, size, generator=g) * 2.0 / size**0.5,
            "last.bias": torch.zeros(L * n),
        },
        str(out / "xlora_classifier.safetensors"),
    )
    (out / "xlora_config.json").write_text(
        json.dumps(
            {
                "base_model_id": BASE_NAME,
                "hidden_size": h,
                "adapters": {a: f"./{a}" for a in adapters},
                "layerwise_scalings": True,
                "enable_relu_and_dropout": True,
                "xlora_depth": 2,
                "xlora_size": size,
                "xlora_dropout_p": 0.2,
                "enable_softmax": True,
                "softmax_temperature": 1.0,
                "scaling_pass_value": 0.0,
                "use_trainable_adapters": False,
                "use_bias": True,
                "global_scaling_weight": 1.0,
                "top_k_lora": None,
                "enable_softmax_topk": False,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "ordering.json").write_text(make_ordering(dims["num_layers"], adapters).to_json())
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m mistralrs_py.lora.demo OUT_DIR", file=sys.stderr)
        return 2
    out = build_demo(args[0])
    print(
        f"wrote an X-LoRA demo checkpoint for {BASE_NAME} to {out}\n"
        f"serve it with: mistralrs x-lora-mistral -x {out} -o {out / 'ordering.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
