#!/usr/bin/env bash
# One GPU session: install as documented, print versions, run the whole test suite (GPU tests
# included), keep the log under $OUT. Usage on the device machine: bash bench/gpu_check.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, platform
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0), "python", platform.python_version())
PY
python3 -m pytest -q -p no:cacheprovider -rs tests "$@" 2>&1 | tee "$OUT/pytest_gpu.log"
exit ${PIPESTATUS[0]}
