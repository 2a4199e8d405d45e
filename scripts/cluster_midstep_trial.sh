#!/bin/bash
# One trial of a worker killed mid-training (docs/pipelined_dni.md, "A lost worker"):
#   scripts/cluster_midstep_trial.sh TRIAL RESTART_AFTER_S KILL_AFTER_S|save
# Starts worker task 1 and the chief on two local ports, kill -9s the worker
# KILL_AFTER_S seconds after the chief's train-begin checkpoint (with "save":
# as soon as the first evaluation's checkpoint save has opened its temporary
# file, i.e. while that save reads the worker's variables), restarts it
# RESTART_AFTER_S seconds later, and prints the chief's exit status and its
# loss/rejoin lines (logs and run in /tmp/midstep_TRIAL). $EXTRA: more flags
# for the chief, e.g. EXTRA=--mixed_precision=bfloat16.
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=2  # MNIST: $DNI_TF_DATA_DIR (or tfds)
P1=$((24000 + RANDOM % 2000)); P2=$((P1 + 1))
CLUSTER="{\"worker\": [\"127.0.0.1:$P1\", \"127.0.0.1:$P2\"]}"
W=/tmp/midstep_$1; rm -rf $W; mkdir -p $W
start_worker() { TF_CONFIG="{\"cluster\": $CLUSTER, \"task\": {\"type\": \"worker\", \"index\": 1}}" python -m dni_tf.pipelined_cluster --threads=1 >> $W/worker.log 2>&1 & echo $! > $W/worker.pid; }
start_worker
TF_CONFIG="{\"cluster\": $CLUSTER, \"task\": {\"type\": \"worker\", \"index\": 0}}" \
  python -m experiments.dni_feedforward --workdir=$W/run --method=cdni --layers=6 --decouple=2 \
  --execution=pipelined --cluster --preset=cpu --steps=600 --eval_every=300 --cluster_probe_seconds=0.5 $EXTRA > $W/chief.log 2>&1 &
CHIEF=$!
while [ ! -f $W/run/checkpoints/rejoin.weights.h5 ]; do sleep 0.2; kill -0 $CHIEF 2>/dev/null || break; done
if [ "$3" = save ]; then
  until compgen -G "$W/run/checkpoints/tmp-*.weights.h5" > /dev/null; do kill -0 $CHIEF 2>/dev/null || break; done
else
  sleep $3
fi
kill -9 $(cat $W/worker.pid); echo "killed at $(date +%T.%N)" >> $W/trial.log
sleep $2
start_worker; echo "restarted at $(date +%T.%N)" >> $W/trial.log
wait $CHIEF; echo "chief exit $?" >> $W/trial.log
kill $(cat $W/worker.pid) 2>/dev/null
cat $W/trial.log; grep -E "lost at|rejoined|failed while|error:|Error" $W/chief.log | cut -c1-250 | head -12
