"""xlora_config.json parsing, the classifier's file layout, and top-k against PEFT's own code."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.lora.classifier import XLoraClassifier, XLoraConfig, XLoraConfigError, top_k_scalings


def test_config_defaults_and_adapters_forms():
    c = XLoraConfig.from_dict({"hidden_size": 8, "adapters": {"x": "./x", "y": "./y"}, "unknown_key": 1})
    assert c.adapters == ["x", "y"] and c.xlora_depth == 1 and c.xlora_size == 2048 and c.enable_softmax
    assert c.scaling_pass_value == 0.0 and c.global_scaling_weight == 1.0 and c.top_k_lora is None
    assert not c.layerwise_scalings and not c.enable_relu_and_dropout and c.use_bias
    assert XLoraConfig.from_dict({"hidden_size": 8, "adapters": ["b", "a"]}).adapters == ["b", "a"]
    assert XLoraConfig.from_dict({"hidden_size": 8}).adapters is None
    with pytest.warns(UserWarning, match="xlora_size"):
        assert XLoraConfig.from_dict({"hidden_size": 8, "xlora_depth": 2}).xlora_size == 2048
    # PEFT's scaling_pass_value None means 1/n
    assert (
        XLoraConfig.from_dict(
            {"hidden_size": 8, "adapters": ["a", "b", "c", "d"], "scaling_pass_value": None}
        ).scaling_pass_value
        == 0.25
    )


@pytest.mark.parametrize(
    "d,msg",
    [
        ({}, "`hidden_size` is required"),
        ({"hidden_size": 8, "adapters": 3}, "`adapters` must be"),
        ({"hidden_size": 8, "xlora_depth": 0}, "at least 1"),
        ({"hidden_size": "x"}, "invalid literal"),
    ],
)
def test_config_errors(d, msg):
    with pytest.raises(XLoraConfigError, match=msg):
        XLoraConfig.from_dict(d)


def test_top_k_out_of_range():
    with pytest.raises(XLoraConfigError, match="`top_k_lora` is 4, but there are 3 adapters"):
        XLoraConfig.from_dict({"hidden_size": 8, "top_k_lora": 4}).check_adapters(3)


@pytest.mark.parametrize("relu", [True, False])
def test_classifier_forward_and_xlora_package_indices(relu):
    """Depth 3 saved by the xlora package (ReLU/Dropout in the same ModuleList: inner.0, inner.3)."""
    cfg = XLoraConfig.from_dict(
        {
            "hidden_size": 6,
            "xlora_depth": 3,
            "xlora_size": 5,
            "layerwise_scalings": True,
            "enable_relu_and_dropout": relu,
            "softmax_temperature": 0.7,
        }
    )
    g = torch.Generator().manual_seed(0)
    t = {
        "inner.0.weight": torch.randn(5, 6, generator=g),
        "inner.0.bias": torch.randn(5, generator=g),
        "inner.3.weight": torch.randn(5, 5, generator=g),
        "inner.3.bias": torch.randn(5, generator=g),
        "last.weight": torch.randn(4 * 2, 5, generator=g),
        "last.bias": torch.randn(8, generator=g),
    }
    clf = XLoraClassifier(cfg, n_adapters=2, n_layers=4)
    clf.load(t)
    h = torch.randn(3, 6, generator=g)
    act = torch.relu if relu else (lambda z: z)
    z = act(act(h @ t["inner.0.weight"].T + t["inner.0.bias"]) @ t["inner.3.weight"].T + t["inner.3.bias"])
    z = (z @ t["last.weight"].T + t["last.bias"]).view(3, 4, 2)  # flat index = layer * n + adapter
    assert torch.allclose(clf(h), torch.softmax(z / 0.7, -1), atol=1e-6)


@pytest.mark.parametrize(
    "change,msg",
    [
        (lambda t: t.pop("inner.3.weight"), "has 1 inner Linear layers, xlora_depth=3 implies 2"),
        (
            lambda t: t.update({"last.weight": torch.zeros(2, 5)}),
            r"last.weight has shape \(2, 5\), expected \(8, 5\) \(4 x 2 adapters: layerwise_scalings=true, 4 wrapped linears\)",
        ),
        (lambda t: t.pop("last.bias"), "missing last.bias"),
    ],
)
def test_classifier_file_errors(change, msg):
    cfg = XLoraConfig.from_dict({"hidden_size": 6, "xlora_depth": 3, "xlora_size": 5, "layerwise_scalings": True})
    t = {
        "inner.0.weight": torch.zeros(5, 6),
        "inner.0.bias": torch.zeros(5),
        "inner.3.weight": torch.zeros(5, 5),
        "inner.3.bias": torch.zeros(5),
        "last.weight": torch.zeros(8, 5),
        "last.bias": torch.zeros(8),
    }
    change(t)
    with pytest.raises(XLoraConfigError, match=msg):
        XLoraClassifier(cfg, 2, 4).load(t)


@pytest.mark.parametrize("k,softmax_topk", [(None, False), (1, False), (2, False), (2, True), (None, True), (3, True)])
def test_top_k_equals_peft(k, softmax_topk):
    from peft.tuners.xlora.layer import XLoraLayer

    s = torch.randn(2, 5, 7, 4, generator=torch.Generator().manual_seed(1))  # [b, s, L, n]
    for layer in range(7):
        peft = XLoraLayer.__new__(XLoraLayer)
        peft.layer_number, peft.config = layer, type("C", (), {"top_k_lora": k, "enable_softmax_topk": softmax_topk})()
        want = peft.get_maybe_topk_scalings(s)
        got = top_k_scalings(s, k, softmax_topk)[:, :, layer]
        assert torch.allclose(got, want, atol=1e-7, equal_nan=True)
    if k is not None:
        assert (top_k_scalings(s, k, softmax_topk) != 0).sum(-1).max() == k
