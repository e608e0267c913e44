#!/usr/bin/env bash
# One device call on nvidia-h200-x2: DDP scaling (bench_ddp.py: 1 GPU, 1 GPU x 2 accumulated, 2 GPUs, FSDP on 2),
# with the decode probe (probe_decode.py) on the second GPU while the first runs the accumulated loss-curve run.
# Needs .whl/ (bitsandbytes, liger-kernel, jsonargparse, docstring_parser, typeshed_client) and .bench/ (run_gpu.sh).
set -uo pipefail
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CKPT=${CKPT:-/tmp/mistral7b-random} HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
(cd .bench && python3 -c "import seed_recipe as s; s.make_checkpoint()") && cp .bench/tokenizer/* "$CKPT/"
B="python3 benchmarks/bench_ddp.py --model $CKPT --data .bench/dolly-15k-head.jsonl --steps ${STEPS:-30} --timeout 200"
CUDA_VISIBLE_DEVICES=0 $B --runs gpu1 | tee -a "$OUT/ddp.jsonl"
CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/probe_decode.py --model "$CKPT" ${PROBE:-1:32} \
  > "$OUT/probe.jsonl" 2> "$OUT/probe.err" &
CUDA_VISIBLE_DEVICES=0 $B --runs gpu1_acc2 | tee -a "$OUT/ddp.jsonl"
wait
$B --runs gpu2 | tee -a "$OUT/ddp.jsonl"
cat "$OUT/probe.jsonl"
[ -n "${FSDP:-}" ] && $B --runs fsdp2 --timeout "${FSDP}" | tee -a "$OUT/ddp.jsonl"
python3 -c "import torch, transformers, peft, bitsandbytes, lightning; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, lightning.__version__)" | tee "$OUT/versions.txt"
