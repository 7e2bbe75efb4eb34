#!/usr/bin/env bash
# The pending GPU measurements of issue #4 in one command, for a session's device run (device time is
# scarce: one call, logs under $OUT). Run from the repo root on the GPU machine:
#   bash bench/gpu_session.sh            (carry .gpu_carry: tokenizer files of the default model in .gpu_carry/tok)
# Prepare here:  mkdir -p .gpu_carry/tok && cp models/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json} .gpu_carry/tok/
#                echo /.gpu_carry/ >> .git/info/exclude
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-session}"; mkdir -p "$OUT"
TOK="${TOK:-.gpu_carry/tok}"
nvidia-smi -L; python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
# 1. correctness first: the backend on CUDA with the attention kernel (graph decoding vs a full forward)
timeout 240 python -m bench.decode --smoke --layers 2 --attention-kernel --tokenizer "$TOK" --out "$OUT" 2>&1 | tee "$OUT/smoke.log"
# 2. 7B-shaped decode: fp16, gptq graph, gptq graph + attention kernel, in one run; kernel table of the last
timeout 420 python -m bench.decode --profile --new 128 --repeats 2 --out "$OUT" 2>&1 | tee "$OUT/decode.log"
# 3. the M = 16 kernels by mode (the 2.5x target)
timeout 240 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 4g128 --m 16 --per-mode 2>&1 | tee "$OUT/kernels-m16.log"
