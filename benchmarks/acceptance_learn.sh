#!/usr/bin/env bash
# Slide-level learning on a generated cohort, from the command line only:
# 120 slides (seed $SEED, default 2029; seeds 2028 and 2029 were never used to choose
# settings), compressed with the published
# multitask-4 NIC encoder, then 5-fold patient-grouped cross-validation of
#   growth_pattern (binary, spatial context only): nic-cnn against meanpool,
#   proliferation (regression) with nic-cnn and abmil, survival (Cox) with nic-cnn,
# and the c-index of the true tumour burden (what a perfect model could reach); then
# proliferation once more on codes of a multitask encoder that nic trains with a mitosis task.
# Usage: [SEED=2029] benchmarks/acceptance_learn.sh WORKDIR [ENCODER]
set -euo pipefail
work=${1:?usage: acceptance_learn.sh WORKDIR [ENCODER]}
here=$(cd "$(dirname "$0")/.." && pwd)
encoder=${2:-$here/../shared/weights/nic-keras/encoder_multitask-4.h5}
mkdir -p "$work" && cd "$work"
[ -f cohort/labels.csv ] || nic synth cohort cohort --slides 120 --size 4096 --seed "${SEED:-2029}"
time nic compress cohort/slides --encoder "$encoder" --out compressed --no-progress
L=cohort/labels.csv
train() { time nic train --compressed compressed --labels $L --folds 5 --threads 1 --overwrite "$@"; }
train --task binary --target growth_pattern --model nic-cnn --out runs/growth_niccnn
train --task binary --target growth_pattern --model meanpool --out runs/growth_meanpool
train --task regression --target proliferation --model nic-cnn --out runs/proliferation_niccnn
train --task regression --target proliferation --model abmil --out runs/proliferation_abmil
train --task survival --time survival_time --event survival_event --model nic-cnn --out runs/survival_niccnn
python - <<'PY'
import pandas as pd
from nic.learn import c_index
p = pd.read_csv("cohort/labels.csv").groupby("patient").first()
print(f"c-index of the true tumour burden: {c_index(p.survival_time.values, p.survival_event.values, p.tumour_burden.values):.3f}")
PY
# Proliferation again, with nic's own supervised multitask encoder (tissue type, nuclei
# density, mitosis; generated patches of seed 12, not the cohort's): ~11 min on 2 cores.
[ -f patches/mitosis.csv ] || nic synth patches patches --n 1500 --seed 12
[ -f mitosis_encoder/encoder/encoder.json ] || nic train-encoder --task tissue=class:patches/tissue_type \
    --task nuclei=regr:patches/nuclei_density.csv --task mitosis=class:patches/mitosis.csv \
    --epochs 12 --max-per-task 1500 --sampling balanced --aug-strength 0.5 --out mitosis_encoder
time nic compress cohort/slides --encoder mitosis_encoder/encoder --out compressed_mitosis --no-progress
train() { time nic train --compressed compressed_mitosis --labels $L --folds 5 --threads 1 --overwrite "$@"; }
train --task regression --target proliferation --model abmil --out runs/proliferation_mitosis_abmil
train --task regression --target proliferation --model nic-cnn --out runs/proliferation_mitosis_niccnn
