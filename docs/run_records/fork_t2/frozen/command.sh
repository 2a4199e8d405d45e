#!/bin/bash
# Does M need to keep learning? Fork seed 0's continuous dni_T2 at 20k with M frozen
# (sg_lr_scale 1e-9: M's step scaled to nothing), train to 26k as the other forks.
export DNI_TF_DATA_DIR=/work/shared/data DNI_TF_USE_TFDS=0
cd /work/main
COMMON="--task=copy --method=dni --truncation=2 --hidden_size=256 --max_length=200 --max_repeats=10 --episodes=continuous --bootstrap_scale=0.1 --seed=0 --eval_every=1000 --steps=26000 --fork_from=/work/main/runs/copy_continuous/seed0/dni_T2"
python -m experiments.copy_task --workdir=runs/fork_t2/frozen $COMMON --sg_lr_scale=1e-9
