#!/bin/bash
# Every study's benchmark on a GPU machine, in one command of at most about 10 minutes.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check
#
# Needs this package installed (`pip install -e .[gpu]` or a TensorFlow with CUDA)
# and a GPU that TensorFlow sees; stops with one line otherwise (GPU_CHECK_ON_CPU=1 runs
# it anyway, to try the script on a CPU machine). Writes into OUT_DIR:
#   machine.txt             TensorFlow, the GPUs and their compute capability
#   benchmarks_all.txt      python -m benchmarks.all --quick: each study's step against
#                           plain Keras, GFLOP/s and the matmul peak (docs/performance.md)
#   threshold_rule.txt      the threshold rule's passes under XLA:GPU (does it fuse what
#                           XLA:CPU does not? docs/performance.md, "Threshold updates")
#   recurrent_dni.txt       chars/s of bptt / dni / dni_aux against a Keras LSTM, with XLA
#                           (PTB from $DNI_TF_DATA_DIR/ptb; skipped without it)
# Each part has its own time limit, so one slow part cannot take the others' time; the
# exit status is 1 if any part failed or was stopped.
set -u
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)  # the caller's folder, before the cd
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1

python - > "$OUT_DIR/machine.txt" 2>&1 <<'EOF'
import sys
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("tensorflow", tf.__version__, "built with CUDA:", tf.test.is_built_with_cuda())
for gpu in gpus:
    print(gpu.name, tf.config.experimental.get_device_details(gpu))
sys.exit(0 if gpus else 3)
EOF
status=$?
cat "$OUT_DIR/machine.txt"
if [ $status -ne 0 ] && [ $status -ne 3 ]; then
    echo "error: could not ask TensorFlow for its GPUs (see $OUT_DIR/machine.txt)" >&2
    exit 1
fi
if [ $status -eq 3 ] && [ "${GPU_CHECK_ON_CPU:-0}" != 1 ]; then
    echo "error: TensorFlow sees no GPU here (see $OUT_DIR/machine.txt); nothing was benchmarked" >&2
    exit 1
fi

failed=0
part() {  # part NAME SECONDS COMMAND...: runs COMMAND, output to OUT_DIR/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds} s): $*"
    timeout -k 15 "$seconds" "$@" > "$OUT_DIR/$name.txt" 2>&1
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "(stopped after ${seconds} s)" >> "$OUT_DIR/$name.txt"
    elif [ $rc -ne 0 ]; then
        echo "(failed: exit $rc)" >> "$OUT_DIR/$name.txt"
    fi
    [ $rc -ne 0 ] && failed=1
    tail -n 25 "$OUT_DIR/$name.txt"
}

part benchmarks_all ${BENCH_ALL_SECONDS:-330} python -m benchmarks.all --quick
part threshold_rule 60 python -m benchmarks.threshold_rule_passes
if [ -d "${DNI_TF_DATA_DIR:-/nonexistent}/ptb" ]; then
    part recurrent_dni 150 python benchmarks/recurrent_dni_benchmark.py --jit_compile \
        --steps=50 --warmup=5 --repeats=2
else
    echo "== recurrent_dni: skipped (no \$DNI_TF_DATA_DIR/ptb)" | tee "$OUT_DIR/recurrent_dni.txt"
fi
exit $failed
