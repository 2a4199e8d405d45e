#!/bin/bash
# The cells of issue 16's recurrent tables that are still missing, in two lanes,
# one per core; every cell resumes, and finished ones are read back, so rerun a lane
# in each sitting until it ends.
#
#     taskset -c 0 nice -n 10 scripts/recurrent_tables_remaining.sh copy
#     taskset -c 1 nice -n 10 scripts/recurrent_tables_remaining.sh ptb
#
# copy: Copy in the continuous stream at T = 8 (3 seeds, 50,000 steps; about 15 min
#       per bptt cell, 35-60 min per dni cell on the 2-core EPYC VM), then Repeat Copy
#       in the continuous stream at 50,000 steps, T = 3 5 2 4 8, seeds 0-2
#       (scripts/copy_table.sh; records archived per cell).
# ptb:  PTB dni_aux with M at the default 0.001 (scripts/ptb_table.sh: LSTM 256,
#       12,000 updates, T = 2 and 5), seeds 0-2; finished cells are read back (T = 5:
#       about 1 h each; T = 2: 2-4 h, every window reruns the previous one for the Aux
#       target). bptt and dni of the PTB table are done (runs/ptb256,
#       runs/ptb256_sg0.001, runs/ptb_guard_seed*).
# Needs $DNI_TF_DATA_DIR (ptb/ptb.char.*.txt for the ptb lane).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
  copy)
    EPISODES=continuous STEPS=50000 scripts/copy_table.sh "0 1 2" "8" || exit 1
    EPISODES=continuous STEPS=50000 scripts/copy_table.sh "0 1 2" "3 5 2 4 8" repeat_copy
    ;;
  ptb)
    SG_LR_SCALE=0.001 METHODS=dni_aux scripts/ptb_table.sh "0 1 2"
    ;;
  *)
    echo "usage: scripts/recurrent_tables_remaining.sh copy|ptb" >&2
    exit 2
    ;;
esac
