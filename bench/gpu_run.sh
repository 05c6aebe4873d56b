#!/usr/bin/env bash
# One device session, on the GPU machine, from the repo root: install as documented, then the
# stages asked for, each logged under $OUT.
#   bash bench/gpu_run.sh tests        # the whole test suite (GPU tests included)
#   bash bench/gpu_run.sh kernels      # the kernel micro-benchmarks
#   bash bench/gpu_run.sh bench ARGS   # bench/tbo_bench.py ARGS
#   bash bench/gpu_run.sh serve ARGS  # bench/serve_bench.py ARGS (one GPU; torchrun it for EP > 1)
#   bash bench/gpu_run.sh roofline ARGS  # bench/roofline.py ARGS (compile plans first: --compile-only --plans DIR)
#   bash bench/gpu_run.sh moe ARGS    # bench/moe_bench.py ARGS (routed experts alone, every candidate, CUDA graphs)
#   bash bench/gpu_run.sh anymodel ARGS  # bench/any_model_bench.py ARGS (backend="tbo" vs Inductor)
#   bash bench/gpu_run.sh reliability  # compute-sanitizer memcheck/racecheck, 1000-step memory loop, rank death (2 GPUs)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -2
python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0), 'python', platform.python_version())" | tee "$OUT/env.txt"
stage=${1:-tests}; shift || true
case "$stage" in
  tests)   python3 -m pytest -q -p no:cacheprovider -rs -x tests "$@" 2>&1 | tee "$OUT/pytest_gpu.log"; exit ${PIPESTATUS[0]} ;;
  gputests) python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests "$@" 2>&1 | tee "$OUT/pytest_gpu_only.log"; exit ${PIPESTATUS[0]} ;;
  kernels) for m in triton_mla triton_elementwise triton_moe triton_gqa; do
             timeout 120 python3 -m tbo_compiler.runtime.kernels.$m 2>&1 | tee -a "$OUT/kernels.log"; done ;;
  reliability)  # issue 8 item 4 and the NCCL rank-death record; parts: step memcheck racecheck memloop faults
           for part in "${@:-step memcheck racecheck memloop faults}"; do for part in $part; do case $part in
             step)    timeout 150 python3 bench/gpu_reliability.py step --out "$OUT" > "$OUT/step.log" 2>&1 ;;
             memcheck|racecheck)
                      timeout 230 compute-sanitizer --tool $part --target-processes all --print-limit 50 --report-api-errors no \
                        --log-file "$OUT/sanitizer_$part.%p.log" python3 bench/gpu_reliability.py step --no-teardown \
                        --out "$OUT/$part" > "$OUT/sanitizer_$part.stdout" 2>&1 ;;
             memloop) timeout 240 python3 bench/gpu_reliability.py memloop --out "$OUT" > "$OUT/memloop.log" 2>&1 ;;
             faults)  timeout 200 python3 bench/gpu_faults.py "$OUT/faults_nccl.json" > "$OUT/faults.log" 2>&1 ;;
           esac; echo "$part rc=$?"; done; done ;;
  anymodel) python3 bench/any_model_bench.py "$@" 2>&1 | tee -a "$OUT/any_model.log"; rc=${PIPESTATUS[0]}
           # the device tool returns a handful of files: traces travel as one archive
           [ -d "$OUT/traces" ] && tar czf "$OUT/traces.tgz" -C "$OUT" traces && rm -rf "$OUT/traces"
           exit $rc ;;
  roofline) timeout ${ROOFLINE_TIMEOUT:-100000} python3 bench/roofline.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/roofline.log"
           rc=${PIPESTATUS[0]}  # rows are written as they finish: a timeout keeps the ones before it
           # the device tool returns a handful of files: the traces travel as one archive
           if ls "$OUT"/trace_*.json >/dev/null 2>&1; then
             tar czf "$OUT/roofline_traces.tgz" -C "$OUT" $(cd "$OUT" && ls trace_*.json) && rm -f "$OUT"/trace_*.json; fi
           exit $rc ;;
  moe)     python3 bench/moe_bench.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/moe_bench.log"; rc=${PIPESTATUS[0]}
           python3 -m pytest -q -p no:cacheprovider -rs tests/test_moe_tuning.py tests/test_triton_moe.py \
             tests/test_triton_moe_tma.py tests/test_triton_sort.py tests/test_linear_f32.py tests/test_triton_gqa.py tests/test_route_topk.py \
             2>&1 | tail -30 | tee "$OUT/pytest_moe_gpu.log"; exit $rc ;;
  serve)   python3 bench/serve_bench.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/serve.log"; exit ${PIPESTATUS[0]} ;;
  bench)   python3 bench/tbo_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"; exit ${PIPESTATUS[0]} ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
