#!/usr/bin/env bash
# Issue 23 on a machine of 2, 4 or 8 H200s: one stage per device call (each well under 600 s),
# every result under $OUT/<stage>/, every process with the NVLink-multicast switches off.
# From the repo root, the same commands on every machine kind (EP = all GPUs of the machine):
#   bash bench/multi_gpu.sh tbo_bench_p2p_off   # 1. bench/tbo_bench.py, NCCL_P2P_DISABLE=1, both slices
#   bash bench/multi_gpu.sh tbo_bench_nvlink    # 1. the same over NVLink
#   bash bench/multi_gpu.sh hf_ep               # 2. bench/hf_ep_bench.py, P2P off then NVLink (or:
#   bash bench/multi_gpu.sh hf_ep_p2p_off       #    one link per call, when both do not fit in one)
#   bash bench/multi_gpu.sh hf_ep_nvlink
#   bash bench/multi_gpu.sh serve               # 3. bench/serve_bench.py under torchrun, serial vs auto, C 32..256
#   bash bench/multi_gpu.sh ep8                 # 4. only on 8 GPUs: both slices, prefill 1024-8192, decode 64-512, both links
#   bash bench/multi_gpu.sh ep8_p2p_off         #    (or one link per call: ep8_p2p_off, ep8_nvlink)
# Knobs (environment): HF_LAYERS (default 4), HF_STYLE (ep; funcol where the image's transformers
# has no DistributedConfig), HF_SHAPES (default 8x512,256x1: prefill 4096 and decode 256 tok/rank),
# SERVE_ARGS (extra serve_bench options, e.g. "--num-requests 128"), NGPU (default: all GPUs),
# MULTI_GPU_DRY=1 (print the commands, run nothing), STAGE_TIMEOUT (s per command, default 280).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
DRY=${MULTI_GPU_DRY:-}
T=${STAGE_TIMEOUT:-280}
stage=${1:-}; shift || true
case "$stage" in
  tbo_bench_p2p_off|tbo_bench_nvlink|hf_ep|hf_ep_p2p_off|hf_ep_nvlink|serve|ep8|ep8_p2p_off|ep8_nvlink) ;;
  *) echo "unknown stage '$stage': tbo_bench_p2p_off tbo_bench_nvlink hf_ep hf_ep_p2p_off hf_ep_nvlink serve ep8 ep8_p2p_off ep8_nvlink"; exit 2 ;;
esac
mkdir -p "$OUT"
if [ -z "$DRY" ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -2
  python3 -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0), 'python', platform.python_version())" | tee "$OUT/env.txt"
  N=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
else
  N=${NGPU:-2}
fi
HF_LAYERS=${HF_LAYERS:-4}
HF_SHAPES=${HF_SHAPES:-8x512,256x1}
HF_STYLE=${HF_STYLE:-ep}

# run LOG CMD...: bounded by $T seconds, logged to $OUT/LOG (printed only with MULTI_GPU_DRY=1)
run() {
  local log=$1; shift
  if [ -n "$DRY" ]; then echo "$*"; return 0; fi
  echo "+ $*" | tee -a "$OUT/$log"
  timeout "$T" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "rc=$rc ($log)" | tee -a "$OUT/$log"
  return "$rc"
}

# 1. / 4.: tbo_bench.py for one link, both slices (NCCL reads NCCL_P2P_DISABLE at start: the
# bench spawns fresh ranks per link itself)
tbo_bench() {  # LINK DIR [extra options]
  local link=$1 dir=$2; shift 2
  local rc=0
  for slice in deepseek_v3 gpt_oss; do
    run "$dir.log" python3 bench/tbo_bench.py --out "$OUT/$dir" --links "$link" --slice "$slice" --world "$N" "$@" || rc=$?
  done
  return $rc
}

# 2.: one fresh torchrun per link
hf_ep() {  # LINK
  local link=$1 env=()
  [ "$link" = p2p_off ] && env=(env NCCL_P2P_DISABLE=1)
  run "hf_ep_$link.log" "${env[@]}" torchrun --standalone --nproc-per-node "$N" bench/hf_ep_bench.py \
    --out "$OUT/hf_ep" --link "$link" --layers "$HF_LAYERS" --shapes "$HF_SHAPES" --style "$HF_STYLE"
}

rc=0
case "$stage" in
  tbo_bench_p2p_off) tbo_bench p2p_off tbo_bench_p2p_off || rc=$? ;;
  tbo_bench_nvlink)  tbo_bench nvlink tbo_bench_nvlink || rc=$? ;;
  hf_ep)         hf_ep p2p_off || rc=$?; hf_ep nvlink || rc=$? ;;
  hf_ep_p2p_off) hf_ep p2p_off || rc=$? ;;
  hf_ep_nvlink)  hf_ep nvlink || rc=$? ;;
  serve)  # EP = all GPUs; TBO off (serial) against auto; the host planning ahead (--overlap)
    T=${STAGE_TIMEOUT:-570}
    # shellcheck disable=SC2086
    run serve.log torchrun --standalone --nproc-per-node "$N" bench/serve_bench.py --slice deepseek_v3 \
      --modes serial,auto --concurrency 32,64,128,256 --overlap --out "$OUT/serve" ${SERVE_ARGS:-} || rc=$? ;;
  ep8|ep8_p2p_off|ep8_nvlink)
    if [ "$N" != 8 ]; then echo "$stage: needs 8 GPUs, this machine has $N"; exit 3; fi
    links="p2p_off nvlink"; [ "$stage" != ep8 ] && links=${stage#ep8_}
    for link in $links; do
      tbo_bench "$link" "ep8_$link" --prefill 1024,2048,4096,8192 --decode 64,128,256,512 || rc=$?
    done ;;
esac
exit $rc
