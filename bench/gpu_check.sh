#!/usr/bin/env bash
# The GPU checks of the kernels in one go: kernel tests without the
# interpreter, the fused-gate tests, and bench/kernels.py at FLUX / Wan sizes.
# Logs and the PNG go to $OUT (the device tool's folder) or out/. Without
# CUDA it still runs (interpreter, CPU columns): about 10 minutes on 2 cores.
#
#   bash bench/gpu_check.sh
#
# Needs torch with CUDA, triton, pytest and hypothesis. Wheels put in .whl/
# (pip download --no-deps hypothesis ...) are installed to /tmp/site first.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/gpu.txt"
import torch, triton
print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
else:   # still useful as a dry run: the kernel tests take the interpreter, the bench the CPU
    print("no CUDA device: kernel tests under TRITON_INTERPRET, bench/kernels.py on CPU")
PY
OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_residuals.py \
    2>&1 | tee "$out/tests.log"
tests=$?
python3 bench/kernels.py --png "$out/kernels.png" 2>&1 | tee "$out/kernels.txt"
exit $(( tests || $? ))
