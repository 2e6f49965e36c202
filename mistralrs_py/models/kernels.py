"""Builds and loads our hand-written CPU kernels (``csrc/*.cpp``) as the torch ops ``mistralrs::*``.

The sources are compiled once per machine on first use (g++ -O3 -march=native, the files in
parallel, about 30 s; cached under ``~/.cache/mistralrs-py``, keyed by the sources, the torch
version, the flags and the CPU) and loaded with ``torch.ops.load_library``. Each op has a fake
(shape-only) implementation, so ``torch.compile`` traces them like aten ops.

  * ``qmm``: quantized matmuls with int8 activations (``csrc/qmatmul.cpp``, AVX-512 VNNI or AVX2;
    ``qmatmul.py`` packs the weights and says whether they are on);
  * ``rms_norm``, ``silu_mul`` (``csrc/elementwise.cpp``), ``decode_attention`` (rope, the cache
    write and single-query attention in one op, ``csrc/attention.cpp``), ``linear`` (dense
    matrix-vector products for decode steps, float32 logits for the head) and X-LoRA's
    ``lora_linear`` (a dense projection and its adapters in one op) and ``lora_add_`` (the adapters
    after any other base) in ``csrc/linear.cpp``: any CPU (AVX-512 when present).

Without a compiler, off Linux, if the build fails, or with ``MISTRALRS_KERNELS=0``, ``available()``
is False and the model runs on torch's ops alone (the same math, more ops per layer).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("mistralrs.kernels")
_SRC_DIR = Path(__file__).with_name("csrc")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mistralrs-py"


def _sources() -> list[Path]:
    return sorted(_SRC_DIR.glob("*.cpp"))


def _cpu_key() -> str:
    # NOTE: -march=native makes the binary specific to this CPU: a shared home directory must not
    # hand one machine's build to another
    try:
        text = Path("/proc/cpuinfo").read_text()
        return "\n".join(ln for ln in text.splitlines() if ln.startswith(("flags", "model name")))[:4096]
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def wide_vectors() -> bool:
    """Whether our kernels are vectorised on this CPU (AVX-512 F+BW, or AVX2 with FMA and F16C: what
    csrc/vec.h builds for). NOTE: otherwise the dense matrix-vector kernel runs its portable loop,
    slower than torch's matmul, and dense projections stay on torch."""
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512bw"} <= flags or {"avx2", "fma", "f16c"} <= flags


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): then torch's bf16 matmul
    (oneDNN) is fast for many rows; without, it runs at a few GFLOP/s and our kernel serves every
    row count (csrc/linear.cpp)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported()) or bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return False


def _run_all(cmds: list[list[str]]) -> None:
    """Runs the compiler commands two at a time; raises with the first failure's message."""
    procs: list[subprocess.Popen] = []
    for cmd in cmds:
        if len(procs) >= max(1, min(2, os.cpu_count() or 1)):
            _wait(procs.pop(0))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        _wait(p)


def _wait(p: subprocess.Popen) -> None:
    out, _ = p.communicate()
    if p.returncode != 0:
        errors = [ln for ln in (out or "").splitlines() if "error" in ln]
        raise RuntimeError(f"{p.args[0]} failed: {(errors[0] if errors else (out or '').strip()[-2000:])}")


def _compile(cxx: str) -> Path:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    srcs = _sources()
    files = sorted(p for p in _SRC_DIR.iterdir() if p.suffix in (".cpp", ".h"))
    key = hashlib.sha256(
        "\0".join(
            [*(f"{f.name}\0{f.read_text()}" for f in files), torch.__version__, " ".join(flags), _cpu_key(), cxx]
        ).encode()
    )
    out = cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    # NOTE: imported only to build (it pulls in setuptools: ~0.1 s of every start otherwise)
    from torch.utils import cpp_extension as ce

    libs = ce.library_paths()
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling our CPU kernels for this CPU (once, ~30 s): %s", out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = [Path(tmp) / f"{s.stem}.o" for s in srcs]
        inc = [f"-I{p}" for p in ce.include_paths()]
        _run_all([[cxx, *flags, *inc, "-c", str(s), "-o", str(o)] for s, o in zip(srcs, objs)])
        so = Path(tmp) / out.name
        _run_all(
            [
                [
                    cxx,
                    *flags,
                    "-shared",
                    *map(str, objs),
                    "-o",
                    str(so),
                    *(f"-L{p}" for p in libs),
                    *(f"-Wl,-rpath,{p}" for p in libs),
                    "-lc10",
                    "-ltorch_cpu",
                    "-ltorch",
                ]
            ]
        )
        os.replace(so, out)  # NOTE: atomic, so concurrent first starts never load a half-written file
    return out


def _register_fakes() -> None:
    # shapes for torch.compile's tracing (the ops never run on fake tensors); once per process
    if _state.get("fakes"):
        return
    _state["fakes"] = True

    @torch.library.register_fake("mistralrs::qmm")
    def _(x, qs, d, mw, bits, f32_out=False):
        return x.new_empty(x.shape[0], qs.shape[0] * 16, dtype=torch.float32 if f32_out else x.dtype)

    @torch.library.register_fake("mistralrs::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("mistralrs::silu_mul")
    def _(x):
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)

    @torch.library.register_fake("mistralrs::argmax_rows")
    def _(x):
        return x.new_empty(x.shape[0], dtype=torch.long)

    @torch.library.register_fake("mistralrs::linear")
    def _(x, w, bias=None, f32_out=False):
        return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32 if f32_out else x.dtype)

    @torch.library.register_fake("mistralrs::lora_linear")
    def _(x, w, bias, a, bt, parts, lam, constant, f32_out=False):
        return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32 if f32_out else x.dtype)

    @torch.library.register_fake("mistralrs::lora_add_")
    def _(y, x, a, bt, parts, lam, constant):
        return None

    @torch.library.register_fake("mistralrs::decode_attention")
    def _(q, k, v, cos, sin, k_cache, v_cache, tables, positions, window, scale, skip_block=-1):
        return q.new_empty(q.shape)


def available() -> bool:
    """Compiles and loads the kernels on first call (thread-safe); never raises."""
    ok = _state.get("ok")
    if ok is not None:
        return ok
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok, why = False, ""
        try:
            if os.environ.get("MISTRALRS_KERNELS", "1") == "0":
                why = "MISTRALRS_KERNELS=0"
            elif not sys.platform.startswith("linux"):
                why = "only built on Linux"
            elif not (cxx := os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
                why = "no C++ compiler (install g++)"
            else:
                torch.ops.load_library(str(_compile(cxx)))
                _register_fakes()
                ok = True
        except Exception as e:  # noqa: BLE001 - any build/load failure means: use torch's ops
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        if not ok:
            log.info("hand-written CPU kernels off (%s); using torch's ops", why)
        _state.update(ok=ok, why=why)
        return ok


def why_unavailable() -> str:
    available()
    return _state["why"]


def ready() -> bool:
    """Whether the kernels are built and loaded, without building them. NOTE: the model never asks
    this: ``load_pipeline`` calls ``available()`` once (which builds) and sets each module's choice
    (``llama.use_cpu_kernels``)."""
    return _state.get("ok", False)


if __name__ == "__main__":  # `python -m mistralrs_py.models.kernels`: build now (`make kernels` runs it)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # NOTE: through the package, not this __main__ module: qmatmul must see the same build state
    from mistralrs_py.models import kernels, qmatmul

    available, why_unavailable = kernels.available, kernels.why_unavailable
    print("CPU kernels:", "ready" if available() else f"off ({why_unavailable()})")
    print("quantized matmuls:", "ready" if qmatmul.available() else f"off ({qmatmul.why_unavailable()})")
