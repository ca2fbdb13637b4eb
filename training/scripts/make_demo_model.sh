#!/usr/bin/env bash
# How Resources/Models/maxquery-liver-demo was made, and the full recipe around it.
#   training/scripts/make_demo_model.sh [WORK_DIR]
# Every step resumes: run it again after an interruption.
#
# The shipped model is steps 1, 2 (stage 1 and the QD stage 2 only), 3 (stage2 and stage1) and 4
# (without the noqd and mc_dropout models), on a 2-core CPU shared with other jobs and without
# native bf16 (fp32): stage 1 took 52 min, stage 2 41 min (beside the before-decoder run). Its stage 1 ran its first 10 epochs
# under a 24-epoch schedule and was then finished as a 12-epoch run (--set stage1.epochs=12), its
# stage 2 its first 3 epochs under an 8-epoch schedule, then as a 5-epoch run: the configured
# epochs are what it had, the learning-rate curve is not exactly this script's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$repo/work_dirs/liver-demo}
py=${PYTHON:-$repo/.venv/bin/python}
config=$repo/training/maxquery_training/configs/cpu_demo.yaml
data=$work/liverbench
mkdir -p "$work"

# 1. The benchmark (release 1.1): real CT anatomy of patients A and H with inserted lesions (three
#    inlier types, one unseen type); test cases from A, H and B (B never trained on).
[ -f "$data/dataset.json" ] || "$py" "$repo/../shared/bench/make_liver_bench.py" --out "$data" --seed 0

# 2. Stage 1 (plain backbone, also the nnU-Net baseline), then stage 2 with and without the QD
#    loss side by side, one core each, then the MC-dropout baseline (paper Tab. 1): stage 1's
#    recipe on its own network, trained with dropout.
"$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" --stage 1
OMP_NUM_THREADS=1 "$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" --stage 2 &
OMP_NUM_THREADS=1 "$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" --stage 2 --no-qd &
wait
"$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" --baseline mc_dropout

# 3. Model folders (SML statistics and anomaly calibration from the training/validation cases).
for run in stage2 stage2_noqd stage1 mc_dropout; do
  "$py" -m maxquery_training.cli export --config "$config" --data "$data" --work "$work" --run "$run" \
    --out "$work/models/$run" --overwrite
done

# 4. The paper's tables on the benchmark's test cases, for all of them and per patient (A and H
#    trained on, B never seen), figures and query usage recorded in the cards.
"$py" -m maxquery_training.evaluate --data "$data" --model "$work/models/stage2" \
  --model "$work/models/stage2_noqd" --model "$work/models/stage1" --model "$work/models/mc_dropout" \
  --out "$work/report" --subset "A=_A_" --subset "H=_H_" --subset "B=_B_" --mc-passes 4 --record-in-card
