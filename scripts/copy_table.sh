#!/bin/bash
# The Copy / Repeat Copy table of docs/recurrent_dni.md, one cell at a time; resumable.
#
#     scripts/copy_table.sh "SEEDS" "TRUNCATIONS" [TASK]     e.g.  scripts/copy_table.sh "0 1" "3 5"
#
# TASK: copy (default) or repeat_copy. Cells go to $RUNS/<task>/seed<S>/<method>_T<T>
# (RUNS defaults to runs/; with SG_LR_SCALE=S other than 1, $RUNS/<task>_sgS/...), and
# each finished cell's records to docs/run_records/ (see
# scripts/archive_runs.py; commit them). Rerunning resumes every unfinished cell and skips the
# finished ones, also on a fresh checkout (they are restored from the archive first; an
# unfinished cell's checkpoints are not archived, so there it starts again). Run one
# process per core (e.g. `taskset -c 0 nice -n 10 ...`).
#
# Environment: SG_LR_SCALE (M's rate over the core's; default 1 for the episodic stream's
# cells, see below, and 0.01 with EPISODES=continuous), SKIP_AUX=1
# (train bptt and dni only; the dni_aux cells can be added by a later run without it),
# STEPS (the budget, default 50000; a finished cell trains on when it is raised, from
# step 0 where its checkpoints are gone, e.g. on a fresh checkout),
# EPISODES=continuous (windows cut every T steps of the episode stream, bootstrap 0.1;
# cells in $RUNS/<task>_continuous/...; default: the episodic stream, bootstrap 1).
#
# In the episodic stream dni_aux is trained only where dni's curriculum reached L >= T
# (with EPISODES=continuous always: windows span episodes there). Below that every
# Copy episode (2L+1 steps) spans at most two windows, the Aux head's only target is
# the zero gradient at the episode's end, and dni_aux trains bit-identically to dni
# (seen: T=5, seed 0, 32,500 steps, every history column equal). The cell then gets
# a marker file `dni_aux_T<T>.identical_to_dni` instead of a run.
set -u
cd "$(dirname "$0")/.."
SEEDS=$1 TRUNCATIONS=$2 TASK=${3:-copy}
# SG_LR_SCALE defaults to 1, the setting the table's first T=3 and T=5 cells were run with
# (the study's default until 2026-12-01); the default is now 0.01 (M ran away at T=2
# with 1), whose cells go to runs/<task>_sg0.01 (docs/recurrent_dni.md).
SG=${SG_LR_SCALE:-1}
if [ "${EPISODES:-stream}" = continuous ]; then
  # An undiscounted bootstrap diverges in an endless stream (docs/recurrent_dni.md).
  ROOT=${RUNS:-runs}/${TASK}_continuous; EPISODE_FLAGS="--episodes=continuous --bootstrap_scale=0.1"
  [ -n "${SG_LR_SCALE:-}" ] && [ "$SG" != 0.01 ] && ROOT=${ROOT}_sg$SG
  SG=${SG_LR_SCALE:-0.01}
elif [ "$SG" = 1 ]; then ROOT=${RUNS:-runs}/$TASK; EPISODE_FLAGS="--episodes=stream --bootstrap_scale=1"
else ROOT=${RUNS:-runs}/${TASK}_sg$SG; EPISODE_FLAGS="--episodes=stream --bootstrap_scale=1"; fi
# A fresh checkout has no runs/: the finished cells come back from docs/run_records.
python scripts/archive_runs.py --restore "${ROOT##*/}" || exit 1
COMMON="--task=$TASK --steps=${STEPS:-50000} --eval_every=2500 --hidden_size=256 --max_length=200 --max_repeats=10 --sg_lr_scale=$SG $EPISODE_FLAGS"
for T in $TRUNCATIONS; do for seed in $SEEDS; do
  dir=$ROOT/seed$seed
  python -m experiments.copy_task --workdir=$dir --method=bptt,dni --truncation=$T $COMMON \
      --seed=$seed || continue
  if [ "${SKIP_AUX:-0}" = 1 ]; then python scripts/archive_runs.py "${ROOT##*/}"; continue; fi
  reached=$(python -c "import pandas; print(int(pandas.read_csv('$dir/dni_T$T/history.csv')['curriculum_length'].max()))")
  if [ "$reached" -ge "$T" ] || [ "${EPISODES:-stream}" = continuous ]; then
    python -m experiments.copy_task --workdir=$dir/dni_aux_T$T --method=dni_aux --truncation=$T \
        $COMMON --seed=$seed
  else
    echo "dni reached L=$reached < T=$T: dni_aux is identical to dni" > $dir/dni_aux_T$T.identical_to_dni
  fi
  python scripts/archive_runs.py "${ROOT##*/}"  # the cell's records into docs/run_records (commit them)
done; done
echo "copy_table: done ($TASK, seeds $SEEDS, T $TRUNCATIONS)"
