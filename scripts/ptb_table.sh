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
# resumes every unfinished cell and reads the finished ones back (on a fresh checkout
# from docs/run_records; unfinished cells start again there). Run one process per
# core (e.g. `taskset -c 0 nice -n 10 ...`). Needs ptb/ptb.char.{train,valid,test}.txt
# under --data_dir (default $DNI_TF_DATA_DIR).
#
# METHODS (default bptt,dni,dni_aux): the methods to train, e.g. METHODS=dni_aux to add
# a method's cells; the seed's table also shows the other finished cells there.
# SG_LR_SCALE (M's rate over the core's): 0.01 by default, the setting these cells were
# started with (the study's default until the twelfth sitting); another value (the
# default is now 0.001) puts its cells in $RUNS/ptb256_sg<S>/.
set -u
cd "$(dirname "$0")/.."
SEEDS=$1
SG=${SG_LR_SCALE:-0.01}
if [ "$SG" = 0.01 ]; then NAME=ptb256; else NAME=ptb256_sg$SG; fi
# Each finished cell's records into docs/run_records (commit them), on failure too.
# A fresh checkout has no runs/: the finished cells come back from docs/run_records.
python scripts/archive_runs.py --restore $NAME || exit 1
trap 'python scripts/archive_runs.py $NAME' EXIT
for seed in $SEEDS; do
  python -m experiments.language_model --workdir=${RUNS:-runs}/$NAME/seed$seed \
      --method=${METHODS:-bptt,dni,dni_aux} --truncation=2,5 --hidden_size=256 --steps=12000 \
      --eval_every=1000 --eval_batches=10 --seed=$seed --sg_lr_scale=$SG || exit 1
  python scripts/archive_runs.py $NAME
done
echo "ptb_table: done (seeds $SEEDS)"
