#!/bin/bash
# The PTB characters table of docs/recurrent_dni.md (issue 16's larger budget), one
# seed at a time; resumable.
#
#     scripts/ptb_table.sh "SEEDS"          e.g.  scripts/ptb_table.sh "0 1 2"
#
# LSTM 256 (twice the earlier 128 units), 12,000 updates of 32 streams x 40 characters
# (15.4M characters, about 3 epochs of PTB's 5.0M training characters; the earlier
# runs had 8,000, about 2), T = 2 and 5, bptt / dni / dni_aux, best-validation test BPC.
# Cells go to $RUNS/ptb256/seed<S>/<method>_T<T> (RUNS defaults to runs/); rerunning
# resumes every unfinished cell and reads the finished ones back. Run one process per
# core (e.g. `taskset -c 0 nice -n 10 ...`). Needs ptb/ptb.char.{train,valid,test}.txt
# under --data_dir (default $DNI_TF_DATA_DIR).
set -u
cd "$(dirname "$0")/.."
SEEDS=$1
# Each finished cell's records into docs/run_records (commit them), on failure too.
trap 'python scripts/archive_runs.py ptb256' EXIT
for seed in $SEEDS; do
  python -m experiments.language_model --workdir=${RUNS:-runs}/ptb256/seed$seed \
      --method=bptt,dni,dni_aux --truncation=2,5 --hidden_size=256 --steps=12000 \
      --eval_every=1000 --eval_batches=10 --seed=$seed || exit 1
  python scripts/archive_runs.py ptb256
done
echo "ptb_table: done (seeds $SEEDS)"
