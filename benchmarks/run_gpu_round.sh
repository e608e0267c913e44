#!/usr/bin/env bash
# One device call on one H200, in parts (PART=...), each side by side where a comparison is made.
# Needs, at the repo root (git-ignored, carried to the GPU machine):
#   .whl/     bitsandbytes 0.50.2, liger-kernel 0.8.5, jsonargparse, docstring_parser, typeshed_client wheels
#   .bench/   ../shared/bench/{seed_recipe.py,seed_predict.py,dolly_lengths.txt}, dolly-15k-head.jsonl, tokenizer/
#   .before/  lit_mistral/ and configs/ of the commit to compare with (git archive <commit> lit_mistral configs)
# PART=round1   Python bytecode on the image (cold and cached imports), the GPU-marked tests, the seed recipe and
#               qlora-fast side by side (twice: time to first step with warm Triton and bytecode caches), the peers
#               and lit_mistral's predict on the first 256 rows of dolly-lengths
# PART=round2   where the imports' time goes (python -X importtime), transformers' continuous batching on the first
#               256 rows of dolly-lengths, checkpoint_layers auto (PART=auto), Llama-2-70B (PART=big)
# PART=parts    batches in parts: the GPU tests of micro_batch_tokens and autofit, then qlora-24gb against
#               micro_batch_tokens auto + checkpoint_layers auto at 24 and 16 GiB; qlora-fast twice (the time to first
#               step's split, cold and warm caches)
# PART=regen    LoRA dropout masks drawn again in backward: the GPU tests (theirs, batches in parts, autofit), then
#               qlora-24gb with micro_batch_tokens auto + checkpoint_layers auto at 16 GiB, and Llama-2-70B with both
#               auto on the whole GPU (PART=big2 with BIG_FLAGS)
# PART=idle     where the ~90 ms per qlora-fast step with no kernel running and the first step's extra ~1.4 s may go:
#               qlora-fast as it is (IDLE_VARIANTS: its label), then one change at a time: telemetry every 10 steps
#               (one device synchronization per step less); CUDA's expandable segments (the first step's thousands of
#               allocations). (torch's fused AdamW against bitsandbytes' paged one, measured here first, is now
#               qlora-fast's optimizer.)
# PART=epilogue the base's product added onto the adapter's output (fused_lora._base_plus): the GPU tests of the fused
#               layers, then qlora-fast with .before/ (the machine's first fit) and this checkout, and qlora-24gb
# PART=shared   one LoRA dropout mask per shared input (compute.shared_dropout) and the prefetch of the build's imports:
#               the GPU tests, .before/ qlora-fast (the machine's first fit: keeps the 4-bit copy), this checkout's
#               qlora-fast per-adapter masks and shared masks (STEPS, the losses side by side), .before/ again (the
#               time to the first step before the prefetch, warm), the profile of a shared-masks step
# PART=offload decoder layers that keep their activations in CPU memory (compute.offload_layers): the GPU tests, the
#               link's copy rates, the 16 GiB mode with OFFLOADS layers offloaded
# PART=offload2 the offloaded layers' memory pass by pass (probe_offload.py), the seed recipe, the 16 GiB mode again
# PART=tiles    the forward kernel of the LoRA dropout reading whole tiles of 128 features (one multiply by A each):
#               the GPU tests of the kernels, the kernels before (.before/) and now over their settings, then qlora-fast
#               before and now
# PART=tiles2   the forward kernel in tiles of 32 to 128 features (registers per thread bounded): the GPU tests of the
#               kernels, the kernels' settings, what bounds the forward (PART=bound at one tiling), then qlora-fast
#               before and now with the fastest forward setting of the sweep (set in this copy of lora_kernels.py)
# PART=both     qlora-fast as it is (stored-once bits, keep_dequantized) against .before/ (the session's start), then
#               the seed recipe
# PART=keep     4-bit weights dequantized once per layer and step (compute.keep_dequantized): the GPU tests of the fused
#               layers and kernels, the seed recipe, qlora-fast before (.before/) and now with it
# PART=bitsonce the forward kernel keeping a program's bit words in registers, stored once (measured 2026-12-02,
#               eighth session: kept): the GPU tests of the kernels, the kernels before (.before/: main) and now over the
#               forward's settings, then qlora-fast before and now with the fastest setting of the sweep
# PART=tiles3   the forward kernel's chosen tiling (64 rows, 32-feature tiles): the GPU tests of the kernels and the
#               step without waits, the seed recipe, qlora-fast before (.before/) and now, the kernels before and now,
#               the 16 GiB mode now, what bounds the forward (probe_dropout_kernel.py); most needed first
# PART=bound    what bounds the dropout's forward kernel (probe_dropout_kernel.py: its loop with one part at a time
#               taken out), at a few tilings; no fits (no checkpoint made)
# PART=syncfree a step that never makes the CPU wait for the GPU (step_scalars.py): the GPU tests, qlora-fast at
#               the commit before (.before/) and now, where steps still wait (probe_syncs.py), the profile of a step
# PART=syncfree2 the seed recipe, the 16 GiB mode (qlora-16gb) before and now, qlora-fast over 50 steps
# PART=slabs    the forward kernel of the LoRA dropout in slabs, its multiply split over features: the GPU tests, the
#               kernels before (.before/) and now, the seed recipe, qlora-fast and qlora-16gb before and now
# PART=slabs2   the GPU tests again (every frame of a failure's stack), the forward kernel's settings, qlora-fast, and
#               qlora-16gb before (.before/) and now
# PART=kernel   LoRA dropout inside the multiply by A (compute.dropout_kernel) and a step without waits on the GPU
#               (the loss gathered at positions found while collating, pinned batches, the NaN check after backward):
#               the GPU tests, the kernels against torch's dropout and multiplies (bench_lora_kernels.py), qlora-fast
#               .before/ (the machine's first fit), this checkout without and with the kernels, the profile of a
#               step with them
# PART=kernel2  the GPU tests after call 1's, the seed recipe, qlora-fast with the kernels over 50 steps against peft's
#               own forward (one mask per adapter, torch's dropout: the loss comparison), with 2 DataLoader workers,
#               and qlora-24gb without and with the kernels, and its auto mode within 16 GiB
# PART=auto16k  qlora-24gb's auto mode within 16 GiB with and without the kernels (PART=kernel2 ran out of time there)
# PART=shared16 the 16 GiB mode with shared masks: qlora-24gb with and without, and its auto mode within 16 GiB
# PART=base     this session's start: the GPU tests of the last round, the seed recipe and qlora-fast side by side (the
#               first fit keeps the 4-bit copy), profiles of qlora-fast's first step and of steps 6-8 (idle time by what
#               launched the kernel after each gap), a one-step fit sampled by py-spy (the time to the first step)
# PART=lever    the LoRA layer as one autograd function (in-place adds in forward and backward): its GPU tests, then
#               qlora-fast with .before/ and this checkout side by side, the profile of this checkout's step, the idle
#               levers of PART=idle against it, and a one-step fit sampled by py-spy (where the start-up goes)
# PART=start    where a fit's start goes: loading a 16-bit folder quantized on the way against an already quantized one
#               (probe_load.py), a one-step fit sampled by py-spy (not pausing the process); then qlora-fast as is and
#               PART=idle's levers not measured yet; qlora-24gb and its 16 GiB auto mode
# PART=copy     the 4-bit copy of the base (Quantization.cache): the GPU tests of this round (TESTS=1), then qlora-fast
#               three times: the first fit quantizes and keeps the copy, the next two load it (time to the first step)
# PART=final    the profile of a qlora-fast step (fused LoRA forward), then PART=regen's Llama-2-70B with the masks kept
# PART=probe    profiles: the engine's phases, a training step's kernels, the predict command (py-spy); peers
# PART=auto     checkpoint_layers auto (24 and 16 GiB budgets) against qlora-24gb, through the CLI
# PART=big      Llama-2-70B's architecture (random, built layer by layer in NF4) trained through the CLI
# PART=peers    one GPU-marked test by name (TEST=...), then the peers on a subset of dolly-lengths
# PART=fused    the fused LoRA forward against peft's; GPU tests; predict warm and forced-256; peers
# PART=lengths  predict on dolly-lengths (first/warm, Liger on/off, adapter), the engine's phases, greedy check
# PART=check    the GPU-marked tests, then the engine alone (bench_engine.py: merged with and without CUDA graphs,
#               4-bit + LoRA) on the dolly-lengths workload
# PART=train    fit qlora-fast and qlora-24gb through the CLI, .before/ then this checkout, 1 GPU
# PART=predict  predict through the CLI on 200 Dolly instructions, every answer forced to 256 tokens (sampling):
#               .before/ then this checkout; then the dolly-lengths workload (1,000 prompts, each row its own
#               max_new_tokens) merged and 4-bit + adapter; the peers: plain generate in static batches of 64,
#               transformers' generate_batch, the seed's pipeline loop
set -uo pipefail
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
# compiled as pip installs them for users (no --no-compile: the first import would compile them, a cold-start cost)
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# the image's packages carry no compiled bytecode and their folders may be read-only: without a cache every process
# would compile torch, sympy, ... again (pip compiles at install on users' machines); this cache stands in for that
export PYTHONPYCACHEPREFIX=/tmp/pycache
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 CKPT=${CKPT:-/tmp/mistral7b-random} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, lightning, triton; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, lightning.__version__, triton.__version__)" | tee -a "$OUT/versions.txt"
if [[ ! "${PART:-check}" =~ ^(big|big2|bound)$ ]] && [ ! -f "$CKPT/config.json" ]; then
  (cd .bench && python3 -c "import seed_recipe as s; s.make_checkpoint()") > /dev/null 2>&1 && cp .bench/tokenizer/* "$CKPT/"
fi
DATA=.bench/dolly-15k-head.jsonl
IMPORTS_ALL="import lit_mistral.cli, peft, bitsandbytes, liger_kernel.transformers, transformers.models.mistral.modeling_mistral"
export PATH=/tmp/site/bin:$PATH  # py-spy
gpu_tests() {  # K [SECONDS]: the GPU-marked tests selected by -k K, their failures (with the stack's frames) and
               # totals to $OUT/gpu-tests.log
  PYTHONPATH=/tmp/site:$PWD timeout ${2:-100} python3 -m pytest -q -m gpu -p no:cacheprovider tests/ -k "$1" 2>&1 \
    | grep -E "^E |passed|failed|\.py:[0-9]+" | tail -40 | tee "$OUT/gpu-tests.log"
}
kernels_before() {  # TILES [FORWARD]: .before/'s kernels timed by this checkout's bench_lora_kernels.py (one way of
                   # timing for both; settings .before/ lacks are left out), tagged "before", to kernels.jsonl
  PYTHONPATH=/tmp/site:$PWD/.before timeout 90 python3 benchmarks/bench_lora_kernels.py --tiles "$1" \
    ${2:+--forward "$2"} | sed 's/^{/{"code": "before", /' | tee -a "$OUT/kernels.jsonl"
}
use_fastest_forward() {  # the forward setting of this checkout's sweep in kernels.jsonl with the least time over the
                        # four shapes, set in this copy of lora_kernels.py (for the fits that follow), to fit-logs.txt
  best=$(python3 -c "
import json, collections
total = collections.defaultdict(float)
for line in open('$OUT/kernels.jsonl'):
    row = json.loads(line)
    if row['path'].startswith('forward ') and 'code' not in row:
        total[row['path'].split()[1]] += row['forward']
print(min(total, key=total.get))")
  echo "fastest forward setting: $best" | tee -a "$OUT/fit-logs.txt"
  IFS=x read -r rows span warps tile <<< "$best"
  sed -i "s/^FORWARD_ROWS, FEATURES_PER_PROGRAM, FORWARD_TILE, FORWARD_WARPS = .*/FORWARD_ROWS, FEATURES_PER_PROGRAM, \
FORWARD_TILE, FORWARD_WARPS = $rows, $span, $tile, $warps/" lit_mistral/modeling/lora_kernels.py
  grep "^FORWARD_ROWS" lit_mistral/modeling/lora_kernels.py | tee -a "$OUT/fit-logs.txt"
}
seed_fit() {  # [SECONDS]: the seed recipe's 12 steps (.bench/seed_recipe.py), its figures to train.jsonl
  (cd .bench && STEPS=12 timeout ${1:-150} python3 seed_recipe.py seed) 2>&1 | grep '^{' | tee -a "$OUT/train.jsonl"
}
fit_before() {  # CONFIG STEPS SECONDS: one fit of .before/'s code (label "before") through bench_cli to train.jsonl
  PYTHONPATH=/tmp/site timeout $(($3 + 5)) python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label before \
    --code .before --fit $1 --steps $2 --warm 5 --timeout $3 | tee -a "$OUT/train.jsonl"
}
fit_logged() {  # LABEL CONFIG STEPS FLAGS LOG: one fit through bench_cli (its figures to train.jsonl), then its log's
                # auto choices, load and time-to-first-step lines to $OUT/LOG
  PYTHONPATH=/tmp/site timeout 170 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label $1 \
    --fit $2 --steps $3 --warm 5 --timeout 160 --fit_flags="$4" | tee -a "$OUT/train.jsonl"
  grep -h "=auto\|Time to the first\|Loaded" /tmp/bench-cli/$1/fit-*.log | cut -c1-900 | tee -a "$OUT/$5"
}
case "${PART:-check}" in
both)
  fit_before qlora-fast 12 95
  fit_logged both qlora-fast 15 "" fit-logs.txt
  seed_fit
  ;;
keep)
  gpu_tests "lora_kernels or fused" 150
  seed_fit
  fit_before qlora-fast 12 95
  fit_logged keep qlora-fast 15 "--model.compute.keep_dequantized true" fit-logs.txt
  ;;
bitsonce)
  gpu_tests "lora_kernels" 150
  kernels_before 32x128 64x1024x4x32
  PYTHONPATH=/tmp/site:$PWD timeout 200 python3 benchmarks/bench_lora_kernels.py --tiles 32x128 \
    --forward ${FORWARD:-64x1024x4x32,32x1024x4x32,64x1024x8x32,128x1024x8x32,32x1024x4x64,64x1024x8x64,64x2048x8x32} \
    | tee -a "$OUT/kernels.jsonl"
  use_fastest_forward
  fit_before qlora-fast 12 95
  fit_logged bitsonce qlora-fast 15 "" fit-logs.txt
  ;;
tiles3)
  gpu_tests "lora_kernels or step_scalars" 150
  seed_fit
  fit_before qlora-fast 12 95
  fit_logged tiles3 qlora-fast 15 "" fit-logs.txt
  kernels_before 32x128
  PYTHONPATH=/tmp/site:$PWD timeout 60 python3 benchmarks/bench_lora_kernels.py --tiles 32x128 | tee -a "$OUT/kernels.jsonl"
  fit_logged tiles3-16gb qlora-16gb 12 "" fit-logs.txt
  PYTHONPATH=/tmp/site:$PWD timeout 60 python3 benchmarks/probe_dropout_kernel.py | tee -a "$OUT/bound.jsonl"
  ;;
tiles2)
  gpu_tests "lora_kernels" 150
  SWEEP=32x1024x4x64,64x1024x8x64,32x1024x4x32,64x1024x4x32,32x512x4x64,32x2048x4x64,16x1024x4x64,64x1024x4x64
  SWEEP=$SWEEP,32x1024x4x128,64x1024x8x128,128x1024x8x64,32x1024x2x64,32x4096x4x64,64x4096x8x64
  PYTHONPATH=/tmp/site:$PWD timeout 200 python3 benchmarks/bench_lora_kernels.py \
    --tiles ${TILES:-32x128,32x128x4x2048,16x128x4} --forward ${FORWARD:-$SWEEP} | tee -a "$OUT/kernels.jsonl"
  PYTHONPATH=/tmp/site:$PWD timeout 60 python3 benchmarks/probe_dropout_kernel.py --rows 32 --span 1024 --warps 4 \
    | tee -a "$OUT/bound.jsonl"
  use_fastest_forward
  fit_before qlora-fast 12 95
  fit_logged tiles2 qlora-fast 15 "" fit-logs.txt
  ;;
bound)
  for tiling in ${BOUND_TILINGS:-64,1024,4 32,1024,4 64,1024,8 128,1024,8}; do
    IFS=, read -r rows span warps <<< "$tiling"
    PYTHONPATH=/tmp/site:$PWD timeout 100 python3 benchmarks/probe_dropout_kernel.py --rows $rows --span $span \
      --warps $warps | tee -a "$OUT/bound.jsonl"
  done
  ;;
tiles)
  gpu_tests "lora_kernels" 150
  kernels_before 32x128
  PYTHONPATH=/tmp/site:$PWD timeout 150 python3 benchmarks/bench_lora_kernels.py \
    --tiles ${TILES:-32x128,32x128x8,64x128x8,32x256x8,16x128x4,32x128x4x2048} \
    --forward ${FORWARD:-64x1024,32x1024,128x1024x8,64x512,64x2048,64x1024x8,32x512x2,128x2048x8,64x16384} \
    | tee -a "$OUT/kernels.jsonl"
  fit_before qlora-fast 12 95
  fit_logged tiles qlora-fast 15 "" fit-logs.txt
  ;;
syncfree)
  gpu_tests "step_scalars or offload" 150
  fit_before qlora-fast 12 95
  fit_logged syncfree qlora-fast 15 "" fit-logs.txt
  SYNCS_OUT=$OUT/syncs.json fit_logged syncs qlora-fast 8 "--trainer.callbacks+=benchmarks.probe_syncs.SyncProbe" \
    fit-logs.txt
  PROFILE_OUT=$OUT/profile-syncfree.json fit_logged profile qlora-fast 9 \
    "--trainer.callbacks+=benchmarks.profile_train.ProfileSteps" fit-logs.txt
  ;;
slabs)
  PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ \
    -k "lora_kernels or step_scalars" 2>&1 | grep -E "^E |passed|failed|(lit_mistral|tests)/[a-z_/]+\.py:[0-9]+" \
    | tail -30 | tee "$OUT/gpu-tests.log"
  kernels_before 32x128
  PYTHONPATH=/tmp/site:$PWD timeout 90 python3 benchmarks/bench_lora_kernels.py --tiles 32x128 \
    --forward ${FORWARD:-32x1024,64x1024,32x512,32x2048,32x16384} | tee -a "$OUT/kernels.jsonl"
  fit_logged slabs qlora-fast 15 "" fit-logs.txt
  fit_before qlora-fast 12 95
  fit_logged slabs-16gb qlora-16gb 12 "" fit-logs.txt
  seed_fit 130
  ;;
slabs2)
  gpu_tests "lora_kernels or step_scalars" 150
  PYTHONPATH=/tmp/site:$PWD timeout 60 python3 benchmarks/bench_lora_kernels.py --tiles "" \
    --forward 64x1024,64x2048,128x1024,64x512 | tee -a "$OUT/kernels.jsonl"
  fit_logged slabs2 qlora-fast 15 "" fit-logs.txt
  fit_logged slabs2-16gb qlora-16gb 12 "" fit-logs.txt
  fit_before qlora-16gb 12 145
  ;;
syncfree2)
  seed_fit
  fit_before qlora-16gb 12 145
  fit_logged syncfree-16gb qlora-16gb 12 "" fit-logs.txt
  fit_logged syncfree50 qlora-fast 50 "" fit-logs.txt
  ;;
offload2)
  # the offloaded layers' memory pass by pass on the real build (probe_offload.py: which tensors stay alive, bounded
  # against unbounded copies), the seed recipe, then the 16 GiB mode with OFFLOADS layers offloaded (steps' own peaks)
  PYTHONPATH=/tmp/site:$PWD timeout 200 python3 benchmarks/probe_offload.py --model "$CKPT" \
    --layouts ${LAYOUTS:-24,0 16,8 16,8,unbounded 20,12} 2>&1 | grep '^{' | tee -a "$OUT/probe-offload.jsonl"
  [ "${SEED:-1}" = 1 ] && seed_fit
  AUTO16="--model.compute.checkpoint_layers auto --model.compute.memory_budget_gib 16"
  for n in ${OFFLOADS:-12 8}; do
    fit_logged off$n-auto16 qlora-24gb ${STEPS:-12} "$AUTO16 --model.compute.offload_layers $n" offload.txt
  done
  ;;
offload)
  # decoder layers that keep their activations in CPU memory (compute.offload_layers): the GPU tests, the link's
  # copy rates (probe_link.py), then qlora-24gb's 16 GiB mode with 8, 12, 16 layers offloaded (the rest auto) and a
  # fixed layout
  gpu_tests "offload or lora_kernels" 120
  python3 benchmarks/probe_link.py --gib 1 | tee -a "$OUT/link.jsonl"
  AUTO16="--model.compute.checkpoint_layers auto --model.compute.memory_budget_gib 16"
  for n in ${OFFLOADS:-12 8 16}; do
    fit_logged off$n-auto16 qlora-24gb ${STEPS:-12} "$AUTO16 --model.compute.offload_layers $n" offload.txt
  done
  ;;
round1)
  python3 -c "import torch, os, glob; d = os.path.dirname(torch.__file__); print('torch dir writable', os.access(d, os.W_OK), 'pyc files', len(glob.glob(d + '/**/__pycache__/*.pyc', recursive=True)))" | tee "$OUT/bytecode.txt"
  IMPORTS=$IMPORTS_ALL
  for run in no-cache cache; do  # seconds to import, the interpreter's own start left out
    ([ $run = no-cache ] && export PYTHONPYCACHEPREFIX=/tmp/pycache-none PYTHONDONTWRITEBYTECODE=1
     PYTHONPATH=/tmp/site:$PWD python3 -c "import time; t = time.perf_counter(); $IMPORTS; print('imports $run', round(time.perf_counter() - t, 1), 's')") | tee -a "$OUT/bytecode.txt"
  done
  PYTHONPATH=/tmp/site:$PWD timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -25 | tee "$OUT/gpu-tests.log"
  seed_fit
  for run in first second; do
    PYTHONPATH=/tmp/site timeout 120 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label $run \
      --fit qlora-fast --steps 20 --warm 5 --timeout 110 | tee -a "$OUT/train.jsonl"
    grep -h "Loaded" /tmp/bench-cli/$run/fit-*.log | cut -c1-300 | tee -a "$OUT/fit-logs.txt"
  done
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA --n 1000 \
    --out /tmp/dolly-lengths.jsonl > /dev/null && head -256 /tmp/dolly-lengths.jsonl > /tmp/dolly-lengths-256.jsonl
  PYTHONPATH=/tmp/site timeout 80 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label ours256 \
    --predict qlora-fast --predict_file /tmp/dolly-lengths-256.jsonl --timeout 75 \
    --predict_flags "--model.generation.max_new_tokens 512" | tee -a "$OUT/predict.jsonl"
  grep -h "Generation engine" /tmp/bench-cli/ours256/predict.log | cut -c1-300 | tee -a "$OUT/predict-logs.txt"
  PYTHONPATH=/tmp/site:$PWD timeout 170 python3 benchmarks/bench_generate_peers.py --model "$CKPT" --n 256 --static_rows 128 \
    --batch_prompts 256 --batch_timeout 90 --file /tmp/dolly-lengths.jsonl --tokenizer .bench/tokenizer 2>&1 \
    | grep -v -i warn | tail -4 | tee -a "$OUT/predict.jsonl"
  ;;
probe)
  # where the time goes: the engine's phases and kernels, a training step's kernels by kind, the predict command
  # sampled by py-spy (start-up included); then the peers on the first 256 dolly-lengths rows
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA --n 1000 \
    --out /tmp/dolly-lengths.jsonl > /dev/null
  PYTHONPATH=/tmp/site:$PWD timeout 170 python3 benchmarks/probe_engine.py --model "$CKPT" --data $DATA --n 1000 \
    --rows 200 --tokens 80000 --variants ${PROBE_VARIANTS:-refill_rows=50 prefill_tokens=16384} 2>&1 \
    | grep '^{' | tee "$OUT/probe-engine.jsonl"
  PROFILE_OUT=$OUT/profile-qlora-fast.json PYTHONPATH=/tmp/site timeout 130 python3 benchmarks/bench_cli.py \
    --model "$CKPT" --data $DATA --label profile --fit qlora-fast --steps 9 --warm 5 --timeout 120 \
    --fit_flags="--trainer.callbacks+=benchmarks.profile_train.ProfileSteps" | tee -a "$OUT/train.jsonl"
  PYTHONPATH=/tmp/site timeout 110 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label spy \
    --predict qlora-fast --predict_file /tmp/dolly-lengths.jsonl --spy "$OUT/predict-spy.txt" --timeout 100 \
    --predict_flags "--model.generation.max_new_tokens 512" | tee -a "$OUT/predict.jsonl"
  PYTHONPATH=/tmp/site:$PWD timeout 170 python3 benchmarks/bench_generate_peers.py --model "$CKPT" --n 256 \
    --batch_prompts 200 --batch_timeout 60 --file /tmp/dolly-lengths.jsonl --tokenizer .bench/tokenizer 2>&1 \
    | grep -v -i warn | tail -4 | tee -a "$OUT/predict.jsonl"
  ;;
fused)
  # the fused LoRA forward against peft's, same checkout, same seed: qlora-fast 50 steps (speed and the loss
  # curve), qlora-24gb 15 steps; the GPU-marked tests; predict on dolly-lengths (warm, sampled by py-spy) and
  # forced-256; the peers on the first rows of dolly-lengths
  PYTHONPATH=/tmp/site:$PWD timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -6 | tee "$OUT/gpu-tests.log"
  for cfg in "qlora-fast 50" "qlora-24gb 15"; do
    set -- $cfg
    for mode in fused peft; do
      flag=$([ $mode = peft ] && echo "--model.compute.fused_lora false" || echo "")
      PYTHONPATH=/tmp/site timeout 150 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label $mode \
        --fit $1 --steps $2 --warm 5 --timeout 140 --fit_flags="$flag" | tee -a "$OUT/train.jsonl"
    done
  done
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA --n 1000 \
    --out /tmp/dolly-lengths.jsonl > /dev/null
  for run in first spy; do
    PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label $run \
      --predict qlora-fast --predict_file /tmp/dolly-lengths.jsonl --timeout 95 \
      $([ $run = spy ] && echo "--spy $OUT/predict-spy.txt") \
      --predict_flags "--model.generation.max_new_tokens 512" | tee -a "$OUT/predict.jsonl"
  done
  PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label forced256 \
    --predict qlora-fast --predict_flags "--model.generation.do_sample true" --timeout 95 | tee -a "$OUT/predict.jsonl"
  PYTHONPATH=/tmp/site:$PWD timeout 110 python3 benchmarks/bench_generate_peers.py --model "$CKPT" --n 128 \
    --batch_prompts 100 --batch_timeout 45 --file /tmp/dolly-lengths.jsonl --tokenizer .bench/tokenizer 2>&1 \
    | grep -v -i warn | tail -4 | tee -a "$OUT/predict.jsonl"
  ;;
peers)
  # one GPU-marked test by name (TEST), then the peers on the first PEERS_N rows of dolly-lengths
  [ -n "${TEST:-}" ] && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 -m pytest -q -p no:cacheprovider tests/ -k "$TEST" 2>&1 \
    | grep -E "^E |passed|failed" | head -20 | tee "$OUT/gpu-tests.log"
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA --n 1000 \
    --out /tmp/dolly-lengths.jsonl > /dev/null
  PYTHONPATH=/tmp/site:$PWD timeout 100 python3 benchmarks/bench_generate_peers.py --model "$CKPT" --n ${PEERS_N:-64} \
    --batch_prompts ${PEERS_N:-64} --batch_timeout 30 --file /tmp/dolly-lengths.jsonl --tokenizer .bench/tokenizer 2>&1 \
    | grep -v -i warn | tail -4 | tee -a "$OUT/predict.jsonl"
  ;;
parts)
  gpu_tests "micro or auto" 120
  for budget in none 24 16; do
    flags=$([ $budget = none ] && echo "" || echo "--model.compute.checkpoint_layers auto --model.compute.micro_batch_tokens auto --model.compute.memory_budget_gib $budget")
    fit_logged parts-$budget qlora-24gb ${STEPS:-12} "$flags" parts.txt
  done
  for run in first second; do
    fit_logged $run qlora-fast 12 "" fit-logs.txt
  done
  ;;
kernel)
  gpu_tests "lora_kernels or shared or fused or regenerat" 150
  PYTHONPATH=/tmp/site:$PWD timeout 150 python3 benchmarks/bench_lora_kernels.py | tee "$OUT/kernels.jsonl"
  KERNEL="--model.compute.dropout_kernel true"
  fit_before qlora-fast 12 95
  fit_logged no-sync qlora-fast ${STEPS:-15} "" fit-logs.txt
  fit_logged kernel qlora-fast ${STEPS:-15} "$KERNEL" fit-logs.txt
  PROFILE_OUT=$OUT/profile-kernel.json fit_logged profile qlora-fast 9 \
    "$KERNEL --trainer.callbacks+=benchmarks.profile_train.ProfileSteps" fit-logs.txt
  ;;
kernel2)
  gpu_tests "lora_kernels or shared or fused or regenerat" 150
  seed_fit
  KERNEL="--model.compute.dropout_kernel true"
  fit_logged kernel50 qlora-fast 50 "$KERNEL" fit-logs.txt
  fit_logged peft50 qlora-fast 50 "--model.compute.fused_lora false --model.compute.shared_dropout false" fit-logs.txt
  fit_logged workers qlora-fast 15 "$KERNEL --data.num_workers 2" fit-logs.txt
  fit_logged 24gb qlora-24gb 12 "" parts.txt
  fit_logged 24gb-kernel qlora-24gb 12 "$KERNEL" parts.txt
  fit_logged 24gb-kernel-auto16 qlora-24gb 12 "$KERNEL --model.compute.checkpoint_layers auto --model.compute.micro_batch_tokens auto --model.compute.memory_budget_gib 16" parts.txt
  ;;
auto16k)
  KERNEL="--model.compute.dropout_kernel true"
  AUTO16="--model.compute.checkpoint_layers auto --model.compute.micro_batch_tokens auto --model.compute.memory_budget_gib 16"
  fit_logged 24gb-kernel-auto16 qlora-24gb 12 "$KERNEL $AUTO16" parts.txt
  fit_logged 24gb-auto16 qlora-24gb 12 "$AUTO16" parts.txt
  ;;
epilogue)
  gpu_tests "shared or fused or regenerat" 90
  fit_before qlora-fast 12 85
  fit_logged after qlora-fast ${STEPS:-15} "" fit-logs.txt
  fit_logged 24gb qlora-24gb 10 "" fit-logs.txt
  ;;
shared)
  gpu_tests "shared or fused or regenerat or adamw" 120
  SHARED="--model.compute.shared_dropout true"
  PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label before-cold \
    --code .before --fit qlora-fast --steps 8 --warm 5 --timeout 95 | tee -a "$OUT/train.jsonl"
  fit_logged per-adapter qlora-fast ${STEPS:-40} "" fit-logs.txt
  fit_logged shared qlora-fast ${STEPS:-40} "$SHARED" fit-logs.txt
  PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label before-warm \
    --code .before --fit qlora-fast --steps 8 --warm 5 --timeout 95 | tee -a "$OUT/train.jsonl"
  grep -h "Time to the first" /tmp/bench-cli/before-*/fit-*.log | cut -c1-300 | tee -a "$OUT/fit-logs.txt"
  PROFILE_OUT=$OUT/profile-shared.json fit_logged profile qlora-fast 9 \
    "$SHARED --trainer.callbacks+=benchmarks.profile_train.ProfileSteps" fit-logs.txt
  ;;
shared16)
  SHARED="--model.compute.shared_dropout true"
  fit_logged 24gb qlora-24gb ${STEPS:-12} "" parts.txt
  fit_logged 24gb-shared qlora-24gb ${STEPS:-12} "$SHARED" parts.txt
  fit_logged 24gb-shared-auto16 qlora-24gb ${STEPS:-12} "$SHARED --model.compute.checkpoint_layers auto --model.compute.micro_batch_tokens auto --model.compute.memory_budget_gib 16" parts.txt
  ;;
base)
  gpu_tests "adamw or regenerat or fused or micro" 150
  seed_fit
  fit_logged base qlora-fast ${STEPS:-15} "" fit-logs.txt
  for start in 0 6; do
    PROFILE_START=$start PROFILE_STEPS=$([ $start = 0 ] && echo 1 || echo 3) PROFILE_OUT=$OUT/profile-start$start.json \
      fit_logged profile$start qlora-fast 9 "--trainer.callbacks+=benchmarks.profile_train.ProfileSteps" fit-logs.txt
  done
  PYTHONPATH=/tmp/site timeout 60 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label spy \
    --fit qlora-fast --steps 1 --warm 0 --timeout 55 --spy_fit "$OUT/fit-spy.txt" | tee -a "$OUT/train.jsonl"
  grep -h "Time to the first\|Loaded\|4-bit copy" /tmp/bench-cli/spy/fit-*.log | cut -c1-400 | tee -a "$OUT/fit-logs.txt"
  ;;
lever)
  gpu_tests "micro or regenerat or fused"
  for code in .before .; do
    label=$([ $code = . ] && echo after || echo before)
    PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label $label \
      --code $code --fit qlora-fast --steps 20 --warm 5 --timeout 95 | tee -a "$OUT/train.jsonl"
  done
  PROFILE_OUT=$OUT/profile-qlora-fast.json PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py \
    --model "$CKPT" --data $DATA --label profile --fit qlora-fast --steps 9 --warm 5 --timeout 95 \
    --fit_flags="--trainer.callbacks+=benchmarks.profile_train.ProfileSteps" | tee -a "$OUT/train.jsonl"
  PYTHONPATH=/tmp/site timeout 60 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label spy \
    --fit qlora-fast --steps 1 --warm 0 --timeout 55 --spy_fit "$OUT/fit-spy.txt" | tee -a "$OUT/train.jsonl"
  grep -h "Time to the first\|Loaded" /tmp/bench-cli/spy/fit-*.log | cut -c1-400 | tee -a "$OUT/fit-logs.txt"
  IDLE_VARIANTS= STEPS=20 PART=idle bash "$0"
  ;;
copy)
  [ -n "${TESTS:-}" ] && gpu_tests "adamw or regenerat or fused"
  for run in writes reads reads-again; do
    fit_logged copy-$run qlora-fast ${STEPS:-8} "" fit-logs.txt
    grep -h "4-bit copy" /tmp/bench-cli/copy-$run/fit-*.log | cut -c1-400 | tee -a "$OUT/fit-logs.txt"
  done
  ;;
start)
  gpu_tests "adamw or micro"
  PYTHONPATH=/tmp/site timeout 150 python3 benchmarks/probe_load.py --model "$CKPT" --out /tmp/mistral7b-nf4 2>&1 \
    | grep '^{' | tee "$OUT/probe-load.jsonl"
  rm -rf /tmp/mistral7b-nf4
  PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label spy \
    --fit qlora-fast --steps 2 --warm 0 --timeout 95 --spy_fit "$OUT/fit-spy.txt" | tee -a "$OUT/train.jsonl"
  grep -h "Time to the first\|Loaded" /tmp/bench-cli/spy/fit-*.log | cut -c1-400 | tee -a "$OUT/fit-logs.txt"
  IDLE_VARIANTS=as-is-adamw-fused STEPS=20 PART=idle bash "$0"
  fit_logged 24gb qlora-24gb 12 "" parts.txt
  fit_logged 24gb-auto16 qlora-24gb 12 "--model.compute.checkpoint_layers auto --model.compute.micro_batch_tokens auto --model.compute.memory_budget_gib 16" parts.txt
  ;;
idle)
  for variant in ${IDLE_VARIANTS-as-is} "log10 --trainer.log_every_n_steps 10" expandable; do
    set -- $variant
    label=$1; shift
    (if [ $label = expandable ]; then export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; fi
     fit_logged idle-$label qlora-fast ${STEPS:-20} "$*" fit-logs.txt)
  done
  ;;
final)
  # the profile of a qlora-fast step after the fused LoRA forward; Llama-2-70B as PART=regen but the masks kept
  PROFILE_OUT=$OUT/profile-qlora-fast.json PYTHONPATH=/tmp/site timeout 130 python3 benchmarks/bench_cli.py \
    --model "$CKPT" --data $DATA --label profile --fit qlora-fast --steps 9 --warm 5 --timeout 120 \
    --fit_flags="--trainer.callbacks+=benchmarks.profile_train.ProfileSteps" | tee -a "$OUT/train.jsonl"
  STEPS=4 BIG_TIMEOUT=${BIG_TIMEOUT:-280} PART=big2 \
    BIG_FLAGS="--model.compute.checkpoint_layers auto --model.compute.micro_batch_tokens auto --model.compute.dropout_masks keep" bash "$0"
  grep -h "=auto\|Time to the first\|Loaded" "$OUT/big-fit.log" | cut -c1-900
  ;;
regen)
  gpu_tests "micro or auto or regenerat"
  auto="--model.compute.checkpoint_layers auto --model.compute.micro_batch_tokens auto"
  fit_logged regen-16 qlora-24gb ${STEPS:-12} "$auto --model.compute.memory_budget_gib 16" parts.txt
  STEPS=6 BIG_TIMEOUT=${BIG_TIMEOUT:-330} BIG_FLAGS="$auto" PART=big2 bash "$0"
  grep -h "=auto\|Time to the first\|Loaded" "$OUT/big-fit.log" | cut -c1-900
  ;;
round2)
  PYTHONPATH=/tmp/site:$PWD python3 -X importtime -c "$IMPORTS_ALL" 2> "$OUT/importtime.txt"
  sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -40
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA --n 1000 \
    --out /tmp/dolly-lengths.jsonl > /dev/null
  PYTHONPATH=/tmp/site:$PWD timeout 130 python3 benchmarks/bench_generate_peers.py --model "$CKPT" --n 256 \
    --batch_prompts 256 --batch_timeout 90 --peers generate_batch --file /tmp/dolly-lengths.jsonl \
    --tokenizer .bench/tokenizer 2>&1 | grep -v -i warn | tail -3 | tee -a "$OUT/predict.jsonl"
  STEPS=12 PART=auto bash "$0"
  STEPS=8 BIG_TIMEOUT=290 PART=big bash "$0"
  ;;
auto)
  # checkpoint_layers auto against qlora-24gb's all-layers checkpointing, side by side: 24 and 16 GiB budgets
  for budget in none 24 16; do
    flags=$([ $budget = none ] && echo "" || echo "--model.compute.checkpoint_layers auto --model.compute.memory_budget_gib $budget")
    fit_logged auto-$budget qlora-24gb ${STEPS:-15} "$flags" auto.txt
  done
  ;;
big2)
  # as big, but the CLI's own output (progress bar included) streamed to $OUT and the TensorBoard events copied
  # there, so a run cut short still says how far it got
  BIG=/tmp/llama-2-70b && mkdir -p $BIG /tmp/big && cp benchmarks/architectures/llama-2-70b/config.json $BIG/ && cp .bench/tokenizer/* $BIG/
  python3 -c "r = open('$DATA').read().splitlines(); open('/tmp/big/train.jsonl', 'w').write(chr(10).join(r[i % 200] for i in range(9000)) + chr(10))"
  PYTHONPATH=/tmp/site timeout ${BIG_TIMEOUT:-300} python3 -m lit_mistral fit --config configs/qlora-24gb.yaml \
    --model.name_or_path $BIG --model.random_init true --data.path /tmp/big/train.jsonl --data.train_records null \
    --data.val_records null --trainer.max_steps ${STEPS:-6} --trainer.default_root_dir /tmp/big \
    --trainer.enable_progress_bar true ${BIG_FLAGS:-} 2>&1 | tr '\r' '\n' | grep -v -i warn > "$OUT/big-fit.log"
  cp -r /tmp/big/lightning_logs "$OUT/big-lightning_logs" 2>/dev/null
  tail -5 "$OUT/big-fit.log"
  ;;
big)
  # Llama-2-70B's architecture with random weights, built layer by layer in NF4 (nothing on disk): fit through the
  # CLI with the qlora-24gb settings (checkpointing, 16,384-token steps)
  BIG=/tmp/llama-2-70b && mkdir -p $BIG && cp benchmarks/architectures/llama-2-70b/config.json $BIG/ && cp .bench/tokenizer/* $BIG/
  PYTHONPATH=/tmp/site timeout ${BIG_TIMEOUT:-560} python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label llama-2-70b \
    --fit ${BIG_CONFIG:-qlora-24gb} --steps ${STEPS:-8} --warm 3 --timeout $((${BIG_TIMEOUT:-560} - 20)) \
    --fit_flags="--model.name_or_path $BIG --model.random_init true ${BIG_FLAGS:-}" | tee -a "$OUT/train.jsonl"
  grep -h "Loaded\|Error\|error" /tmp/bench-cli/llama-2-70b/fit-*.log | cut -c1-300 | tail -5
  ;;
lengths)
  # dolly-lengths through the CLI (qlora-fast merged: a cold first run, then warm runs with and without Liger;
  # qlora-24gb with the adapter kept apart), the engine's phases with and without Liger, greedy agreement
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA --n 1000 \
    --out /tmp/dolly-lengths.jsonl > /dev/null
  for run in cold warm; do
    PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label $run \
      --predict qlora-fast --predict_file /tmp/dolly-lengths.jsonl --timeout 95 \
      --predict_flags "--model.generation.max_new_tokens 512" | tee -a "$OUT/predict.jsonl"
    grep -h "Generation engine\|Loaded\|Merged" /tmp/bench-cli/$run/predict.log | cut -c1-300 >> "$OUT/predict-logs.txt"
  done
  PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label no-liger \
    --predict qlora-fast --predict_file /tmp/dolly-lengths.jsonl --timeout 95 \
    --predict_flags "--model.generation.max_new_tokens 512 --model.compute.kernels null" | tee -a "$OUT/predict.jsonl"
  PYTHONPATH=/tmp/site timeout 100 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label adapter \
    --predict qlora-24gb --predict_file /tmp/dolly-lengths.jsonl --timeout 95 \
    --predict_flags "--model.generation.max_new_tokens 512 --model.generation.weights adapter" | tee -a "$OUT/predict.jsonl"
  grep -h "Generation engine" /tmp/bench-cli/no-liger/predict.log /tmp/bench-cli/adapter/predict.log | cut -c1-300 >> "$OUT/predict-logs.txt"
  PYTHONPATH=/tmp/site:$PWD timeout 120 python3 benchmarks/probe_engine.py --model "$CKPT" --data $DATA --n 1000 \
    --rows 200 --tokens 80000 --variants liger 2>&1 | grep '^{' | tee "$OUT/probe-engine.jsonl"
  PROFILE_OUT=$OUT/profile-qlora-fast.json PYTHONPATH=/tmp/site timeout 110 python3 benchmarks/bench_cli.py \
    --model "$CKPT" --data $DATA --label profile --fit qlora-fast --steps 9 --warm 5 --timeout 105 \
    --fit_flags="--trainer.callbacks+=benchmarks.profile_train.ProfileSteps" | tee -a "$OUT/train.jsonl"
  PYTHONPATH=/tmp/site:$PWD timeout 100 python3 benchmarks/bench_engine.py --model "$CKPT" --data $DATA --n 200 \
    --max-rows 200 --max-tokens 80000 --check 16 --check-tokens 48 --variants merged --out "$OUT/engine.jsonl" 2>&1 \
    | grep '^{' | tail -2
  ;;
check)
  PYTHONPATH=/tmp/site:$PWD timeout 240 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/ 2>&1 | tail -25 | tee "$OUT/gpu-tests.log"
  PYTHONPATH=/tmp/site:$PWD timeout 280 python3 benchmarks/bench_engine.py --model "$CKPT" --data $DATA --n 1000 \
    --max-rows 256 --max-tokens 98304 --check 8 --check-tokens 32 --variants ${ENGINE_VARIANTS:-merged nf4 merged:graphs=0} \
    --out "$OUT/engine.jsonl" 2>&1 | grep -v -i warn | tail -20
  ;;
train)
  for code in .before .; do
    label=$([ "$code" = . ] && echo after || echo before)
    PYTHONPATH=/tmp/site timeout 290 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --code $code \
      --label $label --fit ${CONFIGS:-qlora-fast qlora-24gb} --steps ${STEPS:-20} --warm 5 --timeout 140 \
      | tee -a "$OUT/train.jsonl"
  done
  ;;
predict)
  # forced 256: every answer runs to max_new_tokens (random weights never stop); sampling as BENCHMARKS.md
  PYTHONPATH=/tmp/site timeout 150 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --code .before \
    --label before --predict qlora-fast --predict_flags "--model.do_sample true --model.kernels null" \
    --timeout 140 | tee -a "$OUT/predict.jsonl"
  PYTHONPATH=/tmp/site timeout 150 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label after \
    --predict qlora-fast --predict_flags "--model.generation.do_sample true" --timeout 140 | tee -a "$OUT/predict.jsonl"
  # dolly-lengths: 1,000 prompts, answer i exactly min(L_i, 512) tokens (its own max_new_tokens)
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA --n 1000 \
    --out /tmp/dolly-lengths.jsonl | tee -a "$OUT/predict.jsonl"
  for cfg in qlora-fast qlora-24gb; do
    PYTHONPATH=/tmp/site timeout 200 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --label lengths \
      --predict $cfg --predict_file /tmp/dolly-lengths.jsonl --timeout 190 \
      --predict_flags "--model.generation.max_new_tokens 512 ${LENGTHS_FLAGS:-}" | tee -a "$OUT/predict.jsonl"
  done
  PYTHONPATH=/tmp/site:$PWD timeout 200 python3 benchmarks/bench_generate_peers.py --model "$CKPT" \
    --file /tmp/dolly-lengths.jsonl --tokenizer .bench/tokenizer ${PEERS:-} | tee -a "$OUT/predict.jsonl"
  mkdir -p /tmp/seedbench/bench /tmp/seedbench/data && cp .bench/seed_predict.py /tmp/seedbench/bench/ \
    && cp $DATA /tmp/seedbench/data/ && cp -r .bench/tokenizer /tmp/seedbench/data/mistral-7b-v0.1-tokenizer
  (cd /tmp/seedbench/bench && timeout 120 python3 seed_predict.py 4 8 256) 2>&1 | grep "^{" | tee -a "$OUT/predict.jsonl"
  ;;
esac
