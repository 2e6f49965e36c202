"""Hand-written CPU quantized matmuls (``qmatmul.cpp``): 4- and 8-bit weights times int8-quantized
activations with AVX-512 VNNI, the way llama.cpp multiplies them.

The C++ source is compiled once per machine on first use (about 30 s with g++; cached under
``~/.cache/mistralrs-py``) and registered as the torch op ``mistralrs::qmm``, so ``torch.compile`` calls them like any aten op. Without a compiler, on a
CPU without AVX-512 VNNI, or with ``MISTRALRS_QMATMUL=0``, ``available()`` is False and
``QuantLinear`` keeps torch's own int4/int8 kernels.

Packing (see the layout comment at the top of qmatmul.cpp):
  * ``pack_q4(codes, S, Z)``: w = S * code + Z per 32-block, codes 0..15 -> (qs, d, mw).
  * ``pack_q8(q, S)``: w = S * q per 32-block, q int8 -> (qs, d, mw).
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

log = logging.getLogger("mistralrs.qmatmul")
_SRC = Path(__file__).with_name("qmatmul.cpp")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mistralrs-py"


def _cpu_key() -> str:
    # NOTE: -march=native makes the binary specific to this CPU: a shared home directory must not
    # hand one machine's build to another
    try:
        text = Path("/proc/cpuinfo").read_text()
        return "\n".join(ln for ln in text.splitlines() if ln.startswith(("flags", "model name")))[:4096]
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def _compile(cxx: str) -> Path:
    from torch.utils import cpp_extension as ce

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    libs = ce.library_paths()
    key = hashlib.sha256("\0".join([_SRC.read_text(), torch.__version__, " ".join(flags), _cpu_key(), cxx]).encode())
    out = cache_dir() / f"qmatmul-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling the quantized matmul kernels for this CPU (once, ~30 s): %s", out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        cmd = [cxx, *flags, *(f"-I{p}" for p in ce.include_paths()), str(_SRC), "-o", str(so),
               *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu", "-ltorch"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
        os.replace(so, out)  # NOTE: atomic, so concurrent first starts never load a half-written file
    return out


def _register_fakes() -> None:
    # shapes for torch.compile's tracing (the ops never run on fake tensors)
    @torch.library.register_fake("mistralrs::qmm")
    def _(x, qs, d, mw, bits):
        return x.new_empty(x.shape[0], qs.shape[0] * 16)



def available() -> bool:
    """Compiles and loads the kernels on first call (thread-safe); never raises."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok, why = False, ""
        try:
            if os.environ.get("MISTRALRS_QMATMUL", "1") == "0":
                why = "MISTRALRS_QMATMUL=0"
            elif not sys.platform.startswith("linux"):
                why = "only built on Linux"
            elif not (cxx := os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
                why = "no C++ compiler (install g++)"
            else:
                torch.ops.load_library(str(_compile(cxx)))
                _register_fakes()
                ok = bool(torch.ops.mistralrs.qmm_supported())
                why = "" if ok else "this CPU has no AVX-512 VNNI"
        except Exception as e:  # noqa: BLE001 - any build/load failure means: use torch's kernels
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        if not ok:
            log.info("hand-written quantized kernels off (%s); using torch's int4/int8 kernels", why)
        _state.update(ok=ok, why=why)
        return ok


def why_unavailable() -> str:
    available()
    return _state["why"]


def pack_q4(codes: torch.Tensor, S: torch.Tensor, Z: torch.Tensor):
    """codes [N, K] 0..15, S/Z [N, K/32] float32 with w = S * code + Z -> (qs, d, mw) in the
    kernel's layout, or None when S or Z do not fit float16."""
    N, K = codes.shape
    c = codes.to(torch.uint8).view(N // 16, 16, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [g, c, i, t, lo/hi]
    qs = (c[..., 0] | (c[..., 1] << 4)).reshape(N // 16, K * 8).contiguous()
    d, mw = S.to(torch.float16), Z.to(torch.float16)
    if not (_fits_half(S, d) and _fits_half(Z, mw)):
        return None
    return qs, _groups(d), _groups(mw)


def pack_q8(q: torch.Tensor, S: torch.Tensor):
    """q [N, K] int8, S [N, K/32] float32 with w = S * q -> (qs, d, mw) in the kernel's layout, or
    None when S does not fit float16 (round S to float16 before quantizing against it)."""
    N, K = q.shape
    d = S.to(torch.float16)
    if not _fits_half(S, d):
        return None
    # NOTE: mw undoes the kernel's +128 on the activations: sum (xq + 128) w = sum xq w + 128 sum w
    mw = -128.0 * d.float() * q.view(N, K // 32, 32).sum(-1, dtype=torch.int32).float()
    qs = q.view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).reshape(N // 16, K * 16).contiguous()
    return qs, _groups(d), _groups(mw)


def _groups(t: torch.Tensor) -> torch.Tensor:  # [N, NB] -> [N/16, NB, 16]
    N, NB = t.shape
    return t.view(N // 16, 16, NB).transpose(1, 2).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:  # [N/16, NB, 16] -> [N, NB] float32
    G, NB, _ = t.shape
    return t.transpose(1, 2).reshape(G * 16, NB).float()


def dequantize(qs: torch.Tensor, d: torch.Tensor, mw: torch.Tensor, bits: int) -> torch.Tensor:
    """The effective weight [N, K] float32 of a packed (qs, d, mw): what qmm multiplies by, up to
    the activations' own quantization."""
    G, NB = d.shape[0], d.shape[1]
    N, K = G * 16, NB * 32
    if bits == 4:
        b = qs.view(G, K // 8, 16, 4)
        codes = torch.stack([b & 15, b >> 4], -1).permute(0, 2, 1, 4, 3).reshape(N, NB, 32)
        return (codes.float() * _rows(d)[..., None] + _rows(mw)[..., None]).view(N, K)
    q = qs.view(G, K // 4, 16, 4).permute(0, 2, 1, 3).reshape(N, NB, 32)
    return (q.float() * _rows(d)[..., None]).view(N, K)


def _fits_half(x: torch.Tensor, h: torch.Tensor) -> bool:
    # finite, and rounded to float16's precision (GGUF's own fp16 scales convert exactly; tiny
    # products such as a K-quant's d * sc may land on fp16 subnormals, off by at most 2^-25)
    hf = h.float()
    return bool(torch.isfinite(hf).all()) and bool(((hf - x).abs() <= x.abs() * 2.0**-10 + 2.0**-24).all())


if __name__ == "__main__":  # `python -m mistralrs_py.models.qmatmul`: build now (`make kernels` runs it)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("quantized kernels:", "ready" if available() else f"off ({why_unavailable()})")
