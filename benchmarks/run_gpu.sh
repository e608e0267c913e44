#!/usr/bin/env bash
# One device call, side by side: the seed recipe (and its best plain-HF variants), then lit_mistral's variants.
# Needs, at the repo root (git-ignored, carried to the GPU machine):
#   .whl/    bitsandbytes 0.50.2 and liger-kernel wheels (the GPU image lacks them)
#   .bench/  ../shared/bench/{seed_recipe.py,seed_predict.py,dolly_lengths.txt}, ../shared/data/dolly-15k-head.jsonl
#            and ../shared/data/mistral-7b-v0.1-tokenizer/* in .bench/tokenizer/
# Usage: SEED_VARIANTS="seed:bs=4 ..." VARIANTS="p8k:max_tokens=8192:ckpt=0 ..." benchmarks/run_gpu.sh   (training)
#        PREDICT_VARIANTS="merged:batch=200 ..." SEED_PREDICT_ARGS="8 64 256" benchmarks/run_gpu.sh       (predict)
set -uo pipefail
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CKPT=${CKPT:-/tmp/mistral7b-random} HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -n "${SEED_VARIANTS:-}" ]; then
  (cd .bench && STEPS=${SEED_STEPS:-12} timeout "${SEED_TIMEOUT:-300}" python3 seed_recipe.py $SEED_VARIANTS) 2>&1 \
    | grep -v -i "warn" | tee "$OUT/seed.log"
else
  (cd .bench && python3 -c "import seed_recipe as s; s.make_checkpoint()")
fi
cp .bench/tokenizer/* "$CKPT/"
if [ -n "${VARIANTS:-}" ]; then
  timeout "${OURS_TIMEOUT:-330}" python3 benchmarks/bench_train.py --model "$CKPT" --data .bench/dolly-15k-head.jsonl \
    --steps "${STEPS:-12}" --warm 3 --out "$OUT" --variants $VARIANTS 2>&1 | grep -v -i "warn" | tee "$OUT/ours.log"
fi
if [ -n "${PREDICT_VARIANTS:-}" ]; then
  # seed_predict.py reads ../data/ next to itself: rebuild the ../shared layout
  mkdir -p /tmp/seedbench/bench /tmp/seedbench/data
  cp .bench/seed_predict.py /tmp/seedbench/bench/ && cp .bench/dolly-15k-head.jsonl /tmp/seedbench/data/
  cp -r .bench/tokenizer /tmp/seedbench/data/mistral-7b-v0.1-tokenizer
  (cd /tmp/seedbench/bench && timeout "${SEED_PREDICT_TIMEOUT:-240}" python3 seed_predict.py ${SEED_PREDICT_ARGS:-8 64 256}) \
    2>&1 | grep -v -i "warn" | tee "$OUT/seed_predict.log"
  timeout "${PREDICT_TIMEOUT:-420}" python3 benchmarks/bench_predict.py --model "$CKPT" --data .bench/dolly-15k-head.jsonl \
    --n "${PREDICT_N:-200}" --new 256 --out "$OUT" --variants $PREDICT_VARIANTS 2>&1 | grep -v -i "warn" | tee "$OUT/ours_predict.log"
fi
