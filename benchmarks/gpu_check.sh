#!/usr/bin/env bash
# The code paths that need a CUDA device, in one run (~5 min on one H100/H200):
#   1. the learning tests (slide-level training picks the GPU by default) and the CUDA tests;
#   2. encoder throughput, GPU against this machine's CPU threads;
#   3. compression on the GPU, encoder alone vs end to end, JPEG tiles decoded on the GPU (nvJPEG) and by
#      reader processes: the published NIC encoder (3 x a generated 40,000 px slide) and a ViT-B/16 (timm);
#   4. seconds per slide-level training epoch over 200 compressed slides, GPU and CPU;
#   5. a short multitask encoder training on generated patches (Lightning, 16-bit mixed).
# Usage: benchmarks/gpu_check.sh [NIC_SHARED]   (NIC_SHARED: folder holding weights/nic-keras)
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export NIC_SHARED=${1:-${NIC_SHARED:-$here/../shared}}
enc=$NIC_SHARED/weights/nic-keras/encoder_multitask-4.h5
threads=$(nproc)
work=$(mktemp -d)
py=${PYTHON:-python3}
nic() { "$py" -m nic "$@"; }
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
echo "== tests"
"$py" -m pytest -q -p no:cacheprovider tests/test_learn_e2e.py tests/test_learn_models.py tests/test_learn_data.py \
    tests/test_learn_metrics.py tests/test_encoders.py tests/test_compress_fast.py -k "not lifelines" --tb=short 2>&1
echo "== encoders"
"$py" benchmarks/bench_encoders.py --device cuda --encoder nic-cnn --encoder "$enc" --batch 256 --seconds 5
"$py" benchmarks/bench_encoders.py --device cpu --encoder nic-cnn --batch 64 --threads "$threads" --seconds 5
echo "== compression (readers and batch size: auto)"
"$py" benchmarks/bench_compress.py --device cuda --size 40000 --repeat 3 --encoder "$enc" --threads "$threads" \
    --compare-decode --encoder-seconds 10 --naive-patches 2000 --no-pickle --cache "$work/bench"
"$py" benchmarks/bench_compress.py --device cuda --size 40000 --encoder timm:vit_base_patch16_224 --threads "$threads" \
    --compare-decode --encoder-seconds 10 --naive-patches 500 --no-pickle --cache "$work/bench"
echo "== slide-level training"
"$py" benchmarks/bench_learn.py --device cuda --threads "$threads"
"$py" benchmarks/bench_learn.py --device cpu --threads "$threads" --epochs 1
echo "== encoder training"
nic synth patches "$work/patches" --n 300 --seed 1 >/dev/null
/usr/bin/time -f "train-encoder wall %e s" "$py" -m nic train-encoder --task tissue=class:"$work/patches/tissue_type" \
    --task nuclei=regr:"$work/patches/nuclei_density.csv" --epochs 2 --out "$work/enc" 2>&1 | tail -4
rm -rf "$work"
