#!/usr/bin/env bash
# The pending GPU measurements of issue #4, for a session's device runs (device time is scarce: logs
# under $OUT). Run from the repo root on the GPU machine:
#   bash bench/gpu_session.sh decode     smoke check with the attention kernel + 7B decode (carry .gpu_carry)
#   bash bench/gpu_session.sh pdl        the same with programmatic dependent launches, and the read floor
#   bash bench/gpu_session.sh m16        the half2 tensor-core kernel against the other modes at M = 1 and 16
#   bash bench/gpu_session.sh sweep16    the tensor-core kernel's launch-parameter sweep at M = 16
#   bash bench/gpu_session.sh sweep      the half2 GEMV launch-parameter sweep on the 7B decoding shapes
#   bash bench/gpu_session.sh targets    7B decode, then the M = 1 targets next to the read floor (no smoke check)
#   bash bench/gpu_session.sh actorder   smoke check of the backend on an act-order checkpoint, then 7B decode
#                                        with and without act-order (bench.act_order)
#   bash bench/gpu_session.sh tune       cold tuning, candidates compiled one by one against side by side
#   bash bench/gpu_session.sh offload    the offload CUDA tests, then 7B decode with layers' codes in host memory
#   bash bench/gpu_session.sh cycles     GPU memory left after load / chat / unload cycles through the backend
#   bash bench/gpu_session.sh gluon      the Gluon tensor-core kernel's CUDA tests, then each mode at 16 rows
#   bash bench/gpu_session.sh graphs     load cycles, the backend smoke check and 7B decode (graph capture)
#   bash bench/gpu_session.sh ncu        Nsight Compute counters of the 16-row and M = 1 kernels (bench.ncu_profile)
#   bash bench/gpu_session.sh eight      mode 8 at 8 bits: its CUDA tests, then 8-bit at 1 and 16 rows, each mode's best
#   bash bench/gpu_session.sh pending    mode 8's GPU tests and the checkpoint forms on CUDA, then cold tuning time
#   bash bench/gpu_session.sh pdl8       mode 8 as programmatic dependent launches (act-order: its gather overlapped)
#   bash bench/gpu_session.sh caps79     register caps on modes 7 and 9 at 16 rows (bench.gemv_sweep --registers)
#   bash bench/gpu_session.sh three      mode 8 on 3-bit layers in the fields order: CUDA tests, then 3/4/2-bit at 1 and 16 rows
#   bash bench/gpu_session.sh three2     the backend smoke check on a 3-bit checkpoint, then 7B decode at 3 and 4 bits (carry .gpu_carry)
#   bash bench/gpu_session.sh sweep3     mode 8's configs and register caps on 3-bit layers at one row (bench.gemv_sweep)
#   bash bench/gpu_session.sh verify     every offered config on small shapes (all 16 cases of test_cuda_candidates;
#                                        16 passed on an H200 2026-12-05), the checkpoint forms on CUDA, bench.mode5_blocks
#   bash bench/gpu_session.sh aoab       act-order end to end, o_proj gathering against the attention writing its order,
#                                        in one run (bench.act_order's four engines), twice
#   bash bench/gpu_session.sh generated  the generated calibration source on CUDA: its GPU tests, then a 7B-shaped job on
#                                        builtin text against the same job on generated text (LAYERS of the 7B shape, 8 by default;
#                                        carry .gpu_carry)
#   bash bench/gpu_session.sh m2048      long prompts (M = 2048) on all four 7B shapes, plain and act-order, twice: where
#                                        the dequantize + cuBLAS path's time goes (the dequantize kernel's tiles)
# Prepare here:  mkdir -p .gpu_carry/tok && cp models/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json} .gpu_carry/tok/
#                echo /.gpu_carry/ >> .git/info/exclude
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-session}"; mkdir -p "$OUT"
TOK="${TOK:-.gpu_carry/tok}"
nvidia-smi -L; python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
case "${1:-decode}" in
  decode)
    # correctness first: the backend on CUDA with the attention kernel (graph decoding vs a full forward)
    timeout 150 python -m bench.decode --smoke --layers 2 --attention-kernel --tokenizer "$TOK" --out "$OUT" 2>&1 | tee "$OUT/smoke.log"
    # every cached decoding path (HF attention eager and in a graph, our attention kernel) against a full forward
    timeout 120 python -m bench.decode_paths --layers 4 2>&1 | tee "$OUT/paths.log"
    # 7B-shaped decode: fp16, gptq graph, gptq graph + attention kernel, in one run; kernel table of the last
    timeout 300 python -m bench.decode --profile --new 128 --repeats 2 --out "$OUT" 2>&1 | tee "$OUT/decode.log"
    # the M = 1 kernel targets (4-bit against fp16 and copy bandwidth, 2/3-bit in proportion, act-order)
    timeout 200 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 4g128,4g128a,3g128,2g64 --m 1 \
      --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    ;;
  pdl)
    # programmatic dependent launches: the M = 1 kernels back to back with and without PDL next to a
    # plain read of the same bytes, then 7B decode with and without PDL
    timeout 200 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 4g128,3g128,2g64 --m 1 --pdl --floor \
      --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    timeout 270 python -m bench.decode --profile --new 128 --repeats 2 --pdl --out "$OUT" 2>&1 | tee "$OUT/decode.log"
    ;;
  m16)
    # the half2 tensor-core kernels (modes 5, 6) and act-order staging (sx): each mode's best at M = 1 and 16, then 7B decode
    timeout 320 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 4g128,4g128a,2g64 --m 1,16 --per-mode \
      --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    timeout 240 python -m bench.decode --profile --new 128 --repeats 1 --out "$OUT" 2>&1 | tee "$OUT/decode.log"
    ;;
  targets)
    timeout 280 python -m bench.decode --profile --new 128 --repeats 2 --out "$OUT" 2>&1 | tee "$OUT/decode.log"
    timeout 280 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 4g128,4g128a,3g128,2g64 --m 1 --floor \
      --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    ;;
  actorder)
    timeout 270 python -m bench.decode --smoke --layers 2 --attention-kernel --act-order --tokenizer "$TOK" --out "$OUT" 2>&1 | tee "$OUT/smoke.log"
    timeout 300 python -m bench.act_order --profile --out "$OUT" 2>&1 | tee "$OUT/act_order.log"
    ;;
  tune)
    timeout 330 python -m bench.tune_time --m 1,16 2>&1 | tee "$OUT/tune_time.log"
    ;;
  offload)
    timeout 200 python -m pytest -q -p no:cacheprovider tests/backends/gptq/test_offload.py -k "offloaded or to_host" 2>&1 | tee "$OUT/offload_tests.log"
    timeout 360 python -m bench.offload --gpu-layers 32,16,0 --new 64 --out "$OUT" 2>&1 | tee "$OUT/offload.log"
    ;;
  cycles)
    timeout 200 python -m bench.load_cycles --cycles 4 --tokenizer "$TOK" 2>&1 | tee "$OUT/cycles.log"
    ;;
  gluon)
    # the Gluon tensor-core kernel (mode 7): its CUDA tests with the capture-stream and offload CUDA tests,
    # then each mode's best at 16 rows next to fp16 and the read floor
    timeout 240 python -m pytest -q -p no:cacheprovider tests/backends/gptq/test_gluon_mma.py \
      tests/backends/gptq/test_graph_decoder.py tests/backends/gptq/test_offload.py 2>&1 | tee "$OUT/tests.log"
    timeout 330 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 4g128,4g128a --m 16 --per-mode \
      --floor --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    ;;
  graphs)
    # graph decoding after the capture-stream change: memory over load cycles, the backend smoke check
    timeout 200 python -m bench.load_cycles --cycles 4 --tokenizer "$TOK" 2>&1 | tee "$OUT/cycles.log"
    timeout 200 python -m bench.decode --smoke --layers 2 --attention-kernel --tokenizer "$TOK" --out "$OUT" 2>&1 | tee "$OUT/smoke.log"
    timeout 180 python -m bench.decode --profile --new 128 --repeats 1 --out "$OUT" 2>&1 | tee "$OUT/decode.log"
    ;;
  ncu)
    # hardware counters: throughput, occupancy and stall reasons of each tuner pick (CASES overrides)
    CASES="${CASES:-8192x28672:4g128:16:7,4096x11008:4g128:16:7,8192x28672:4g128:16:5,4096x11008:4g128:1:4,8192x28672:4g128:1:4,8192x28672:2g64:1:4}"
    REP=/tmp/gptq-prof; rm -f "$REP.ncu-rep" /tmp/gptq-picks.json
    # the tuner's picks outside ncu (under it every launch is slowed and the picks change)
    timeout 200 python -m bench.ncu_profile --cases "$CASES" --picks /tmp/gptq-picks.json --pick-only 2>&1 | tee "$OUT/picks.log"
    timeout 420 ncu --clock-control none --profile-from-start off --set full --import-source no -f -o "$REP" \
      python -m bench.ncu_profile --cases "$CASES" --picks /tmp/gptq-picks.json > "$OUT/ncu_run.log" 2>&1
    echo "ncu exit $?"; tail -25 "$OUT/ncu_run.log"
    python -m bench.ncu_profile --summarize "$REP.ncu-rep" 2>&1 | tee "$OUT/summary.txt"
    ncu --import "$REP.ncu-rep" --page details > "$OUT/details.txt" 2>&1
    # where each kernel's stall samples sit (its first profiled launch): before, in and after its K loop
    for k in gptq_mma4_kernel gptq_gemm_h2_kernel gptq_gemv_h2_kernel; do
      ncu --import "$REP.ncu-rep" --page source --csv --print-source sass --kernel-name "$k" --launch-count 1 \
        > "$OUT/source_$k.csv" 2>/dev/null && grep -q '^"Address"' "$OUT/source_$k.csv" || rm -f "$OUT/source_$k.csv"
    done
    python -m bench.ncu_profile --sources "$OUT"/source_*.csv 2>&1 | tee "$OUT/sources.txt"
    ;;
  eight)
    # 8-bit layers on mode 8 (built 2026-12-04 without a GPU): float64 checks of every offered config, then
    # each mode's best at 1 and 16 rows next to fp16 and the read floor (the portable modes 0/2/3 before)
    timeout 300 python -m pytest -q -p no:cacheprovider tests/backends/gptq/test_gluon_gemv.py -k "8-128" 2>&1 | tee "$OUT/tests.log"
    timeout 280 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 8g128,4g128 --m 1,16 --per-mode \
      --floor --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    ;;
  pdl8)
    # mode 8 launched as a programmatic dependent launch (built 2026-12-04 without a GPU): its CUDA PDL test,
    # then act-order and plain 4-bit layers at 16 rows with and without PDL (the gather lets it start at once)
    timeout 200 python -m pytest -q -p no:cacheprovider tests/backends/gptq/test_gluon_gemv.py -k pdl 2>&1 | tee "$OUT/tests.log"
    timeout 300 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 4g128a,4g128 --m 16 --modes 8 --pdl \
      --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    ;;
  caps79)
    # ptxas register caps on the other 16-row kernels (mode 8's took 4-bit 8192x28672 from 48 to 45.4-46.4 us)
    timeout 280 python -m bench.gemv_sweep --mode 7 --m 16 --shapes 4096x11008,8192x28672 --registers 0,200,232,248 \
      2>&1 | tee "$OUT/caps7.log"
    timeout 280 python -m bench.gemv_sweep --mode 9 --m 16 --bits 2 --shapes 4096x11008,8192x28672 --registers 0,168,200,232 \
      2>&1 | tee "$OUT/caps9.log"
    ;;
  pending)
    # the GPU tests of mode 8 not run in the 2026-12-04 20:10 session (3-bit act-order, 4-bit g32, the tuner
    # tests) and every checkpoint form through the CUDA load path (written 2026-12-05, never run on a GPU),
    # then cold tuning time with the register-capped candidates (bench.tune_time)
    timeout 330 python -m pytest -q -p no:cacheprovider tests/backends/gptq/test_gluon_gemv.py \
      -k "3-128-True or 4-32 or tuner" 2>&1 | tee "$OUT/tests.log"
    GPTQ_WEBUI_TOKENIZER="$TOK" timeout 200 python -m pytest -q -p no:cacheprovider -rs \
      tests/backends/gptq/test_checkpoint_forms.py -k cuda 2>&1 | tee "$OUT/forms.log"
    timeout 240 python -m bench.tune_time --m 1,16 2>&1 | tee "$OUT/tune_time.log"
    ;;
  three)
    # 3-bit layers in mode 8's fields order (kernel_runtime.fields3; first run on an H200 2026-12-05 04:32): the 3-bit
    # CUDA tests of mode 8, the backend smoke check, then 3-bit against 4-bit (and 2-bit) at 1 and 16 rows
    timeout 200 python -m pytest -q -p no:cacheprovider tests/backends/gptq/test_gluon_gemv.py -k "matches_float64_over and (1024-3 or 512-3 or 768-3) or tuner" 2>&1 | tee "$OUT/tests.log"
    timeout 280 python -m bench.kernels --shapes 4096x11008,8192x28672 --cases 4g128,3g128,2g64 --m 1,16 --per-mode \
      --floor --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    ;;
  three2)
    # the backend on a 3-bit checkpoint in the fields order (graph decoding vs a full forward), then 7B-shaped
    # decode at 3 and 4 bits in one call
    timeout 150 python -m bench.decode --smoke --layers 2 --attention-kernel --bits 3 --tokenizer "$TOK" --out "$OUT" 2>&1 | tee "$OUT/smoke3.log"
    timeout 200 python -m bench.decode --new 128 --repeats 1 --bits 3 --ckpt /tmp/bench-7b-3bit --out "$OUT" 2>&1 | tee "$OUT/decode3.log"
    timeout 200 python -m bench.decode --new 128 --repeats 1 --out "$OUT" 2>&1 | tee "$OUT/decode4.log"
    ;;
  sweep3)
    # mode 8 on fields-order 3-bit layers at one row: every tile, split, pipeline form and register cap (4096x11008
    # is 3% over the proportional target: 0.93-0.94 of the 4-bit time against 0.915, its best config 9.7 us once)
    timeout 500 python -m bench.gemv_sweep --mode 8 --m 1 --bits 3 --shapes 4096x11008,8192x28672 \
      --registers 0,96,128,168 --budget-s 90 2>&1 | tee "$OUT/sweep3.log"
    ;;
  verify)
    # written 2026-12-05 after mode 5's two-block tiles were found wrong: the rest of the candidates test (5 of 16
    # cases ran on an H100 that day), every checkpoint form through the CUDA load path, mode 5 by blocks a tile
    timeout 420 python -m pytest -q -p no:cacheprovider --durations=0 tests/backends/gptq/test_cuda_candidates.py \
      2>&1 | tee "$OUT/candidates.log"
    GPTQ_WEBUI_TOKENIZER="$TOK" timeout 100 python -m pytest -q -p no:cacheprovider -rs \
      tests/backends/gptq/test_checkpoint_forms.py -k cuda 2>&1 | tee "$OUT/forms.log"
    timeout 60 python -m bench.mode5_blocks 2>&1 | tee "$OUT/mode5_blocks.log"
    ;;
  aoab)
    # the attention kernel writing o_proj's order (3428a9b) against o_proj gathering, in the same run: two rounds of
    # the four engines (H100 2026-12-05: 1.005 / 1.003 of no act-order, o_proj gathering 0.975 / 0.987)
    for round in 1 2; do
      timeout 280 python -m bench.act_order --out "$OUT/aoab-$round" 2>&1 | tee "$OUT/aoab-$round.log"
    done
    ;;
  m2048)
    # M = 2048 was last measured on an H100 (2026-11-23: 1.11x-1.22x fp16, 28672x8192 the one over 1.2x, while its
    # act-order twin ran 1.11x): two rounds of all four shapes, each with the dequantize kernel and the matmul
    # timed apart and the dequantize kernel's other tiles, so the spread and the slack are both seen
    for round in 1 2; do
      timeout 280 python -m bench.kernels --shapes 4096x11008,11008x4096,8192x28672,28672x8192 --cases 4g128,4g128a \
        --m 2048 --out "$OUT/m2048-$round" 2>&1 | tee "$OUT/m2048-$round.log"
    done
    ;;
  generated)
    # the generated calibration source on a GPU (built 2026-12-05 on CPU): weights straight onto the GPU, the batch
    # fitted to the memory left, steps replayed from a CUDA graph; its CUDA tests, then the 7B-shaped job on builtin
    # and on generated text, same run
    GPTQ_WEBUI_TOKENIZER="$TOK" timeout 90 python -m pytest -q -p no:cacheprovider -rs -s \
      tests/quantizer/test_generated_calibration.py tests/backends/gptq/test_graph_decoder.py \
      -k "gpu or batch_fits or side_by_side" 2>&1 | tee "$OUT/gen_tests.log"
    timeout 220 python -m bench.quantize_speed --random-7b --layers "${LAYERS:-8}" --calib builtin,generated \
      --nsamples 128 --seqlen 512 --no-baseline --keep-random --record 2>&1 | tee "$OUT/gen_speed.log"
    tail -8 bench/RESULTS.md > "$OUT/gen_results.md"
    # each step replayed from a CUDA graph against the eager forward, same model and rows
    timeout 120 python -m bench.generated_speed --rows 64 --tokens 128 2>&1 | tee "$OUT/gen_graph.log"
    ;;
  sweep16)
    # launch parameters of the half2 tensor-core kernel at M = 16
    timeout 330 python -m bench.gemv_sweep --mode 5 --m 16 --shapes 4096x11008,8192x28672 --budget-s 70 2>&1 | tee "$OUT/sweep16.log"
    ;;
  sweep)
    timeout 540 python -m bench.gemv_sweep --budget-s 100 2>&1 | tee "$OUT/sweep.log"
    ;;
esac
