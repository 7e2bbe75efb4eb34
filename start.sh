#!/usr/bin/env bash
# One command: install everything into .venv, put the default model in models/, start the UI.
#   ./start.sh [webui flags...]     start the UI on http://127.0.0.1:7860 (e.g. --port 7861)
#   ./start.sh test [pytest args]   install the test extras and run the whole suite
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(pwd)"
VENV="$ROOT/.venv"
CACHE="${GPTQ_WEBUI_CACHE:-$HOME/.cache/gptq-webui}"
LLAMA_CPP_VERSION="0.3.36"
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 OMP_WAIT_POLICY=PASSIVE
export PIP_DISABLE_PIP_VERSION_CHECK=1

MODE="run"
if [[ "${1:-}" == "test" ]]; then MODE="test"; shift; fi
TOTAL=4; [[ $MODE == test ]] && TOTAL=5
STEP=0
step() { STEP=$((STEP + 1)); echo; echo "==> [$STEP/$TOTAL] $*"; }
note() { echo "    $*"; }
die() { echo "ERROR: $*" >&2; exit 1; }

# -- 1. Python and the virtual environment --------------------------------------------------
step "Python environment (.venv)"
PYTHON=""
for candidate in ${PYTHON_FOR_VENV:-} python3 python3.11 python3.12 python3.13; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    PYTHON="$(command -v "$candidate")"; break
  fi
done
[[ -n "$PYTHON" ]] || die "Python 3.11 or newer is needed (found: $(python3 --version 2>&1 || echo none))"
if [[ ! -x "$VENV/bin/python" ]]; then
  note "creating .venv with $PYTHON"
  "$PYTHON" -m venv "$VENV" || die "could not create .venv (on Debian/Ubuntu: apt install python3-venv)"
else
  note ".venv exists ($("$VENV/bin/python" --version))"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# pip -q still prints one warning per unreachable index folder on some machines: keep the log readable
pip_quiet() {
  local log rc=0; log="$(mktemp)"
  "${PIP[@]}" "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 40 || true
  rm -f "$log"; return $rc
}

# -- 2. Packages ----------------------------------------------------------------------------
step "Packages"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU="$(nvidia-smi -L | head -n1)"
  note "NVIDIA GPU found: $GPU"
  if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
    LLAMA_VARIANT="cuda"; export CMAKE_ARGS="-DGGML_CUDA=on"
    note "llama.cpp: building with CUDA (nvcc found)"
  else
    LLAMA_VARIANT="cpu"
    note "llama.cpp: CPU build (no CUDA compiler nvcc found; install the CUDA toolkit for GPU offload)"
  fi
else
  GPU=""; LLAMA_VARIANT="cpu"
  note "no NVIDIA GPU: CPU mode (llama.cpp CPU build)"
fi
if [[ "$(uname -m)" == x86_64 ]]; then
  # llama.cpp builds for the CPU it is compiled on (-march=native). On CPUs with AMX (Xeon Sapphire Rapids
  # and later) that turns on ggml's AMX matmul, which crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the
  # default model's first decode with llama-cpp-python 0.3.36: build without AMX, keep AVX-512 / VNNI.
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"
  LLAMA_VARIANT="$LLAMA_VARIANT-noamx"  # its own wheel cache and install stamp: AMX builds are never reused
fi
REQ_FILES=(requirements.txt); [[ $MODE == test ]] && REQ_FILES+=(requirements-test.txt)
STAMP="$VENV/.installed-$(cat "${REQ_FILES[@]}" | sha256sum | cut -c1-16)-$LLAMA_VARIANT"
if [[ -f "$STAMP" ]]; then
  note "requirements already installed (delete $STAMP to force)"
else
  WHEELS="$CACHE/wheels/$LLAMA_VARIANT"
  mkdir -p "$WHEELS"
  "${PIP[@]}" install -q --upgrade pip wheel >/dev/null 2>&1 || true
  note "installing torch 2.13.0 (a CPU wheel on CPU machines when one is at hand)"
  pip_quiet install -q "torch==2.13.0" || die "could not install torch 2.13.0"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    note "building llama-cpp-python $LLAMA_CPP_VERSION ($LLAMA_VARIANT): the FIRST install compiles llama.cpp,"
    note "about 9 minutes on 2 cores. The wheel is kept in $WHEELS so reinstalls take seconds."
    JOBS="$(nproc 2>/dev/null || echo 2)"
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION" \
      > "$CACHE/llama-cpp-build.log" 2>&1 &
    BUILD_PID=$!
    START=$SECONDS
    while kill -0 "$BUILD_PID" 2>/dev/null; do
      sleep 15; printf "    ... still compiling llama.cpp (%ds)\n" $((SECONDS - START))
    done
    wait "$BUILD_PID" || die "llama-cpp-python failed to build; see $CACHE/llama-cpp-build.log"
    note "llama-cpp-python built in $((SECONDS - START))s"
  else
    note "using cached llama-cpp-python wheel from $WHEELS"
  fi
  # the wheel of this build flavour replaces whatever llama-cpp-python the venv holds (pip would keep an
  # installed one of the same version, such as an AMX build from before)
  pip_quiet install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl \
    || die "could not install the llama-cpp-python wheel from $WHEELS"
  for req in "${REQ_FILES[@]}"; do
    note "installing $req"
    pip_quiet install -q --find-links "$WHEELS" -r "$req" || die "pip install -r $req failed"
  done
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
"$PY" - <<'PYEOF'
import torch
print("    torch", torch.__version__, "| CUDA:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)")
PYEOF

# -- 3. Default model -----------------------------------------------------------------------
step "Default model (SmolLM2-135M-Instruct)"
"$PY" -m webui.default_model --models-dir "$ROOT/models" || die "default model setup failed (see above)"

if [[ $MODE == test ]]; then
  step "Browser for the UI tests"
  if [[ -n "${CHROMIUM:-}" && -x "${CHROMIUM}" ]] || command -v chromium >/dev/null 2>&1; then
    note "chromium: $(command -v chromium || echo "$CHROMIUM")"
  else
    note "chromium is missing: browser tests will fail. Install it: sudo apt-get install -y chromium"
  fi
  step "Test suite"
  # no trailing "tests": pytest.ini's testpaths gives the whole suite when no path is passed, and a
  # path passed after `test` then runs alone (with "tests" appended it ran everything anyway)
  exec "$PY" -m pytest -q -ra --durations=15 "$@"
fi

# -- 4. Start -------------------------------------------------------------------------------
step "Starting the web UI (open http://127.0.0.1:7860 unless --port says otherwise; Ctrl+C to stop)"
exec "$PY" -m webui --model SmolLM2-135M-Instruct "$@"
