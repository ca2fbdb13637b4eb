#!/usr/bin/env bash
# How Resources/Models/maxquery-liver-demo was made (2 CPU cores: about 1 hour of training, 2 hours in all,
# before the MC-dropout baseline's run was added: it repeats stage 1's recipe).
#   training/scripts/make_demo_model.sh [WORK_DIR]
# Every step resumes: run it again after an interruption.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$repo/work_dirs/liver-demo}
py=${PYTHON:-$repo/.venv/bin/python}
config=$repo/training/maxquery_training/configs/cpu_demo.yaml
data=$work/liverbench
mkdir -p "$work"

# 1. The benchmark: real CT anatomy with inserted lesions (three inlier types, one unseen type).
[ -f "$data/dataset.json" ] || "$py" "$repo/../shared/bench/make_liver_bench.py" --out "$data" --seed 0

# 2. Stage 1 (plain backbone, also the nnU-Net baseline), then stage 2 with and without the QD
#    loss side by side, one core each.
"$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" --stage 1
OMP_NUM_THREADS=1 "$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" --stage 2 &
OMP_NUM_THREADS=1 "$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" --stage 2 --no-qd &
wait
# The MC-dropout baseline (paper Tab. 1): stage 1's recipe on its own network, trained with dropout.
"$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" --baseline mc_dropout

# 3. Model folders (SML statistics and anomaly calibration from the training/validation cases).
for run in stage2 stage2_noqd stage1 mc_dropout; do
  "$py" -m maxquery_training.cli export --config "$config" --data "$data" --work "$work" --run "$run" \
    --out "$work/models/$run" --overwrite
done

# 4. The paper's tables on the benchmark's test cases, for all of them and per anatomy (A is the
#    training anatomy, B a different patient and contrast phase), figures recorded in the cards.
"$py" -m maxquery_training.evaluate --data "$data" --model "$work/models/stage2" \
  --model "$work/models/stage2_noqd" --model "$work/models/stage1" --model "$work/models/mc_dropout" --out "$work/report" \
  --subset "A=_A_" --subset "B=_B_" --mc-passes 4 --record-in-card

# 5. The same inside the organ alone (no margin), for the analysis in README "Status of the demo model".
"$py" -m maxquery_training.evaluate --data "$data" --model "$work/models/stage2" \
  --model "$work/models/stage2_noqd" --out "$work/report_organ_only" --margin-mm 0 \
  --subset "A=_A_" --scores maxquery,msp,maxlogit
