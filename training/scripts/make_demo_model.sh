#!/usr/bin/env bash
# How Resources/Models/maxquery-liver-demo was made, and the full recipe around it.
#   training/scripts/make_demo_model.sh [WORK_DIR]
# Every step resumes: run it again after an interruption.
#
# The shipped model is steps 1-4 on this project's 2-core CPU (fp32), each run straight through
# (cpu_demo.yaml, seed 1): stage 1 in 31 min alone; the two stage-2 runs side by side, one thread
# each (the QD run was stopped after epoch 25 of 40 and resumed alone with two threads; a resumed
# run keeps its schedule). Runs are seeded; CPU kernels are not bit-reproducible, so figures of a
# new run differ slightly. Never run a two-thread job beside another job on 2 cores: OpenMP's
# oversubscribed threads made an export 10x slower here.
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
#    loss side by side, one core each, then the MC-dropout baseline (paper Tab. 1): the plain
#    network with dropout, fine-tuned from stage 1 (mc_dropout in the config).
train() {
  "$py" -m maxquery_training.cli train --config "$config" --data "$data" --work "$work" "$@"
}
train --stage 1
OMP_NUM_THREADS=1 train --stage 2 & qd=$!
OMP_NUM_THREADS=1 train --stage 2 --no-qd & no_qd=$!
wait $qd && wait $no_qd
train --baseline mc_dropout

# 3. Model folders (SML statistics and anomaly calibration from the training/validation cases,
#    nnU-Net's postprocessing decided on the validation cases). For time, every model's SML
#    statistics come from the first 20 training cases, and the MC-dropout baseline (8 passes per
#    case) is calibrated on 4 of the 12 validation cases.
export_run() {
  "$py" -m maxquery_training.cli export --config "$config" --data "$data" --work "$work" --run "$1" \
    --out "$work/models/$1" --overwrite "${@:2}"
}
export_run stage2 --set training_cases_for_sml=20
export_run stage2_noqd --set training_cases_for_sml=20
export_run stage1 --set training_cases_for_sml=20
export_run mc_dropout --set validation_cases_for_calibration=4

# 4. The paper's tables on the benchmark's test cases, for all of them and per patient (A and H
#    trained on, B never seen), figures and query usage recorded in the cards.
"$py" -m maxquery_training.evaluate --data "$data" --model "$work/models/stage2" \
  --model "$work/models/stage2_noqd" --model "$work/models/stage1" --model "$work/models/mc_dropout" \
  --out "$work/report" --subset "A=_A_" --subset "H=_H_" --subset "B=_B_" --mc-passes 4 --record-in-card
