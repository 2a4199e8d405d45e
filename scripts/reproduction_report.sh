#!/bin/bash
# Regenerates docs/reproduction_report.md (and its figures) from the records of the runs
# behind README's tables: it first archives their runs/ folders into docs/run_records/
# (scripts/archive_runs.py), then reads the archive, so runs from earlier sittings
# count; a missing seed directory is left out, and the across-seeds sections average
# the seeds present. The archive began on 2026-12-01 (ninth sitting): the runs before
# it are gone, so the report is regenerated with --keep_from=OUT: every section of the
# committed report whose runs are not in the archive is kept (marked as kept) until
# its cells are rerun.
#
#     scripts/reproduction_report.sh [OUT]        # default docs/reproduction_report.md
#
# How the runs were made: gradient dropping, README ("at the write-up's budget");
# Copy, scripts/copy_table.sh (copy_sg0.01 and copy_reset: the commands in docs/recurrent_dni.md;
# copy_continuous: EPISODES=continuous STEPS=20000 SKIP_AUX=1 scripts/copy_table.sh);
# PTB, scripts/ptb_table.sh; feed-forward DNI and targeted dropout, their docs;
# threshold updates (about 10 minutes on one core), with
#   T="--accumulation=sum --batch_size=64 --clip=0 --dataset=mnist --decay=0.9 --eval_every=500
#      --hidden=256,256 --learning_rate=0.1 --model=mlp --noise_stddev=0 --optimizer=sgd --seed=0
#      --steps=2000 --target_accuracy=0.9"
#   python -m experiments.threshold_updates $T --max_delay=0 --sparse_backward=false \
#       --thresholds=0,0.0001,0.001,0.01,0.03,0.1 --workdir=runs/report/tu_plain
#   python -m experiments.threshold_updates $T --max_delay=0 --sparse_backward=true \
#       --thresholds=0,0.0001,0.001,0.01,0.03,0.1 --workdir=runs/report/tu_sparse
#   python -m experiments.threshold_updates $T --max_delay=4 --sparse_backward=false \
#       --thresholds=0,0.0001,0.001,0.01 --workdir=runs/report/tu_delay4
set -u
cd "$(dirname "$0")/.."
candidates=(
  runs/gd_mnist_20k_seed0 runs/gd_mnist_20k_seed1 runs/gd_mnist_20k_seed2
  runs/report/tu_plain runs/report/tu_sparse runs/report/tu_delay4
  runs/mnist_fcn_15k runs/mnist_cnn3_w32 runs/mnist_fcn4_sparse_0.2 runs/mnist_fcn4_sparse_0.5
  runs/mnist_fcn4_unlock runs/mnist_fcn4_unlock_cdni
  runs/copy_ablation/seed0
  runs/copy_sg0.01/seed0 runs/copy_sg0.01/seed1 runs/copy_sg0.01/seed2
  runs/copy_reset/seed0 runs/copy_reset/seed1 runs/copy_reset/seed2
  runs/copy_continuous/seed0 runs/copy_continuous/seed1 runs/copy_continuous/seed2
  runs/repeat_copy_continuous/seed0 runs/repeat_copy_continuous/seed1
  runs/repeat_copy_continuous/seed2
  runs/ptb256/seed0 runs/ptb256/seed1 runs/ptb256/seed2
  runs/ptb256_sg0.001/seed0 runs/ptb256_sg0.001/seed1 runs/ptb256_sg0.001/seed2
  runs/td_fashion_20ep
)
# The candidates' records into the archive (probes and other runs/ folders stay out).
to_archive=()
for d in "${candidates[@]}"; do [ -d "${RUNS:-runs}/${d#runs/}" ] && to_archive+=("${d#runs/}"); done
[ ${#to_archive[@]} -gt 0 ] && python scripts/archive_runs.py "${to_archive[@]}"
present=()
for d in "${candidates[@]/#runs\//docs/run_records/}"; do
  # A sweep counts once finished (its own results.json); a table root (Copy) once
  # one of its runs has a results.json.
  if compgen -G "$d/results.json" > /dev/null \
      || { [[ $d != */gd_* ]] && compgen -G "$d/*/results.json" > /dev/null; }; then
    present+=("$d")
  else
    echo "left out (not finished yet): $d" >&2
  fi
done
# Not listed: runs/copy/seed{0,1,2}, the table at --sg_lr_scale=1 (gone before the
# archive began, kept from the committed report; the archive holds one rerun cell of
# it, which would replace the whole seed's section). The table at the default is
# runs/copy_sg0.01.
RUNS=$(IFS=,; echo "${present[*]}")
OUT=${1:-docs/reproduction_report.md}
KEEP=()
[ -f "$OUT" ] && KEEP=(--keep_from="$OUT")
python -m dni_tf.apps report --runs="$RUNS" --out="$OUT" --copy_figures "${KEEP[@]}"
