#!/bin/bash
# The cells of issue 16's recurrent tables that are still missing, in two lanes,
# one per core; every cell resumes, and finished ones are read back (on a fresh
# checkout from docs/run_records), so rerun both lanes in each sitting until they end.
#
#     taskset -c 0 nice -n 10 scripts/recurrent_tables_remaining.sh copy
#     taskset -c 1 nice -n 10 scripts/recurrent_tables_remaining.sh repeat
#
# copy:   Copy in the continuous stream at T = 8 (3 seeds, 50,000 steps), then Repeat
#         Copy in the continuous stream at 50,000 steps, T = 3 2 8, seeds 0-2.
# repeat: Repeat Copy in the continuous stream at 50,000 steps, T = 5 4, seeds 0-2
#         (the two lanes never share a cell: cells have no lock).
# ptb:    PTB dni_aux with M at the default 0.001 (scripts/ptb_table.sh: LSTM 256,
#         12,000 updates, T = 2 and 5), seeds 0-2 (finished 2026-12-02; kept to
#         rebuild the table).
# Per cell on the 2-core Intel Xeon (AMX) VM of the eighteenth sitting: about 8 min
# for bptt, 10-17 min for dni and dni_aux at 50,000 steps (the AMD EPYC VM of earlier
# sittings took 2-4x as long); PTB dni_aux T = 2 about 45 min. Records are archived per
# cell (scripts/copy_table.sh, scripts/ptb_table.sh).
# Needs $DNI_TF_DATA_DIR (ptb/ptb.char.*.txt for the ptb lane).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
  copy)
    EPISODES=continuous STEPS=50000 scripts/copy_table.sh "0 1 2" "8" || exit 1
    EPISODES=continuous STEPS=50000 scripts/copy_table.sh "0 1 2" "3 2 8" repeat_copy
    ;;
  repeat)
    EPISODES=continuous STEPS=50000 scripts/copy_table.sh "0 1 2" "5 4" repeat_copy
    ;;
  ptb)
    SG_LR_SCALE=0.001 METHODS=dni_aux scripts/ptb_table.sh "0 1 2"
    ;;
  *)
    echo "usage: scripts/recurrent_tables_remaining.sh copy|repeat|ptb" >&2
    exit 2
    ;;
esac
