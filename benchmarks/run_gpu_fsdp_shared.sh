#!/usr/bin/env bash
# One device call on ONE H200 (no 2-GPU machine needed): what each process of a 2-process run holds on its GPU under
# DDP, fsdp_qlora, and fsdp_qlora with --model.load_on cpu (bench_ddp.py's shared_* runs: two processes share the
# GPU over gloo); then fsdp_qlora on one GPU loaded on the device vs on the CPU (same losses? how much slower to
# start?). Needs .whl/ and .bench/ (as run_gpu_scaling.sh). PART=shared or PART=load runs one half.
set -uo pipefail
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CKPT=${CKPT:-/tmp/mistral7b-random} HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, lightning; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, lightning.__version__)" | tee "$OUT/versions.txt"
nproc | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
(cd .bench && python3 -c "import seed_recipe as s; s.make_checkpoint()") && cp .bench/tokenizer/* "$CKPT/"
echo "checkpoint: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu.txt"
B="python3 benchmarks/bench_ddp.py --model $CKPT --data .bench/dolly-15k-head.jsonl"
if [ "${PART:-shared}" = shared ]; then
  $B --steps 4 --val_every 2 --warm 1 --timeout 200 --runs shared_fsdp_cpu shared_fsdp shared_ddp -- \
    --data.max_tokens 2048 --model.compute.gradient_checkpointing true | tee -a "$OUT/shared.jsonl"
else
  python3 - <<'PY' | tee -a "$OUT/load.jsonl"
import json, torch
from bitsandbytes.functional import quantize_4bit
torch.manual_seed(0)  # one Mistral MLP weight's shape: is NF4 quantized on the CPU bit for bit the GPU's?
w = torch.randn(14336, 4096, dtype=torch.bfloat16) * 0.02
q = {d: quantize_4bit(w.to(d), quant_type="nf4", quant_storage=torch.bfloat16) for d in ("cpu", "cuda")}
print(json.dumps(dict(check="nf4 cpu vs cuda", packed_equal=torch.equal(q["cpu"][0].view(torch.uint8), q["cuda"][0].cpu().view(torch.uint8)),
                      absmax_max_diff=float((q["cpu"][1].absmax - q["cuda"][1].absmax.cpu()).abs().max()))))
PY
  $B --steps 10 --val_every 5 --warm 2 --timeout 200 --runs fsdp1 fsdp1_cpu | tee -a "$OUT/load.jsonl"
fi
for f in /tmp/bench-ddp/*.log; do grep -h "fsdp_qlora: sharded\|^Loaded\|Error\|error" "$f" | head -8 | sed "s|^|$(basename $f): |"; done | tee "$OUT/logs.txt"
cp /tmp/bench-ddp/*.log "$OUT/" 2>/dev/null
