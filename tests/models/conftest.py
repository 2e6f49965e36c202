"""Fixtures of the model tests."""

import pytest

from mistralrs_py.models import kernels


@pytest.fixture(params=["cpu-kernels", "torch-ops"])
def ops(request) -> bool:
    """Runs a test with our fused CPU ops (models/csrc) and again with torch's ops alone: whether
    load_ours turns the model's CPU kernels on."""
    if request.param == "cpu-kernels" and not kernels.available():
        pytest.skip(f"CPU kernels off: {kernels.why_unavailable()}")
    return request.param == "cpu-kernels"
