#!/usr/bin/env bash
# The GPU measurements behind README.md's figures, one mode per device call, each side by side with its peer:
#
#   benchmarks/run_gpu.sh train     the seed recipe, then qlora-fast, qlora-24gb and qlora-16gb through the CLI
#   benchmarks/run_gpu.sh memory    qlora-24gb against its `auto` modes within 24 and 16 GiB budgets
#   benchmarks/run_gpu.sh plan      the memory plan at 8, 16, 24, 40, 80 GiB and the whole GPU, each against the
#                                   hand-tuned settings for that budget (benchmarks/train/bench_plan.py --part budgets);
#                                   ONLY="plan-40 handauto-40 ..." runs those labels alone
#   benchmarks/run_gpu.sh plan-long the plan at 24 GiB on 2,048-token rows for LONG_STEPS (200) steps, then the time to
#                                   the first step with the plan against its settings fixed, cold and resumed;
#                                   CAP_MEMORY=1 (plan and plan-long) keeps the allocator capped at the budget during the
#                                   steps too, as a card of the budget's size would (benchmarks/train/cap_memory.py);
#                                   DEADLINE (plan, plan-long, plan-cost): seconds after which no fit starts (520);
#                                   each plan's facts and training passes (layout, peak, times) go to $MODE-logs.txt
#                                   (benchmarks/train/plan_passes.py)
#   benchmarks/run_gpu.sh plan-cost the cost of planning: the time to the first step with the plan (where its time
#                                   went, time_plan.py) against its settings fixed, cold and resumed, at BUDGETS (16 24)
#   benchmarks/run_gpu.sh big       Llama-2-70B's architecture (random, built layer by layer in NF4) with qlora-24gb
#   benchmarks/run_gpu.sh predict   predict on the dolly-lengths workload (1,000 prompts): qlora-fast merged,
#                                   qlora-24gb with the adapter kept apart; PEERS=1 adds transformers' peers and the
#                                   seed's pipeline loop
#   benchmarks/run_gpu.sh serve     `serve` under 64 and 256 streaming clients (openai's async client) on the same
#                                   1,000 dolly-lengths requests, then predict on them in the same call: qlora-fast
#                                   merged; RUNS="qlora-24gb:adapter" for the 4-bit base + adapter (a call of its own);
#                                   PEERS=1 adds `transformers serve --continuous-batching` under the same load
#                                   (PEER_N rows, PEER_CLIENTS clients, PEER_S seconds); CLIENTS="256" runs one count;
#                                   SERVE_FLAGS go to serve only (e.g. "--max_rows 200": fewer rows than its 256).
#                                   Needs .whl-serve/ too (fastapi, uvicorn, openai and their dependencies)
#   benchmarks/run_gpu.sh kernels   the LoRA dropout kernels against torch's dropout and multiplies
#   benchmarks/run_gpu.sh tests     the GPU-marked tests (TESTS=-k expression to select)
#   benchmarks/run_gpu.sh inputs    a pass's GPU memory with the recomputing layers' inputs in CPU memory and without,
#                                   on a tiny model (benchmarks/train/probe_inputs.py)
#   benchmarks/run_gpu.sh ddp       several GPUs (a 2-GPU machine): 1 GPU, 1 GPU accumulating 2, 2 GPUs DDP, and
#                                   FSDP=SECONDS adds fsdp_qlora on 2
#   benchmarks/run_gpu.sh fsdp-shared  on one GPU: what each of 2 processes holds under DDP, fsdp_qlora, and
#                                   fsdp_qlora loading on the CPU
#
# Before/after: put the code to compare with in .before/ (`mkdir .before && git archive <commit> lit_mistral configs
# | tar -x -C .before`); train, predict and kernels then run it too, labelled "before", right before this checkout.
# Needs, at the repository root (git-ignored; carry them to the GPU machine), as benchmarks/README.md says:
#   .whl/    wheels the GPU image lacks: bitsandbytes, liger-kernel, jsonargparse, docstring_parser, typeshed_client
#   .bench/  ../shared/bench/{seed_recipe.py,seed_predict.py,dolly_lengths.txt}, ../shared/data/dolly-15k-head.jsonl,
#            and ../shared/data/mistral-7b-v0.1-tokenizer/* in .bench/tokenizer/
# Settings: OUT (default ./bench-out), CONFIGS (train's configs), STEPS, FAST_FLAGS (extra flags for qlora-fast; none
# by default: its memory plan fits the GPU).
# Output: JSON lines in $OUT/<mode>.jsonl, and gpu.txt, versions.txt; name them for results/ as benchmarks/README.md says.
set -uo pipefail
MODE=${1:?usage: benchmarks/run_gpu.sh train|memory|plan|plan-long|plan-cost|big|predict|serve|kernels|tests|inputs|ddp|fsdp-shared}
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
# compiled as pip installs them for users (no --no-compile: the first import would compile them, a cold-start cost)
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# the image's packages carry no bytecode and may be read-only: this cache stands in for what pip compiles for users
export PYTHONPYCACHEPREFIX=/tmp/pycache
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 CKPT=${CKPT:-/tmp/mistral7b-random} HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, lightning, triton; print(torch.__version__, \
transformers.__version__, peft.__version__, bitsandbytes.__version__, lightning.__version__, triton.__version__)" \
  | tee -a "$OUT/versions.txt"
if [ "$MODE" != inputs ] && [ ! -f "$CKPT/config.json" ]; then  # Mistral-7B-v0.1's exact config, random weights
  (cd .bench && python3 -c "import seed_recipe as s; s.make_checkpoint()") > /dev/null 2>&1 && cp .bench/tokenizer/* "$CKPT/"
fi
DATA=.bench/dolly-15k-head.jsonl
FAST_FLAGS=${FAST_FLAGS-}

codes() {  # the checkouts to run, .before/ first when it is there
  [ -d .before ] && echo .before
  echo .
}
label() {  # CODE: "before" for .before/, else "now"
  [ "$1" = .before ] && echo before || echo now
}
fit() {  # CODE LABEL CONFIG STEPS FLAGS: one fit through bench_cli (its figures to train.jsonl), then its log's
         # auto choices, load and time-to-first-step lines to fit-logs.txt
  PYTHONPATH=/tmp/site timeout 200 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --code "$1" \
    --label "$2" --fit "$3" --steps "$4" --warm 5 --timeout 190 --fit_flags="$5" | tee -a "$OUT/$MODE.jsonl"
  grep -h "=auto\|Time to the first\|Loaded" /tmp/bench-cli/$2/fit-*.log 2>/dev/null | cut -c1-900 \
    | tee -a "$OUT/fit-logs.txt"
}
seed_fit() {  # [SECONDS]: the seed recipe's 12 steps (.bench/seed_recipe.py), its figures beside the fits
  (cd .bench && STEPS=12 timeout ${1:-150} python3 seed_recipe.py seed) 2>&1 | grep '^{' | tee -a "$OUT/$MODE.jsonl"
}
gpu_tests() {  # K [SECONDS]: the GPU-marked tests selected by -k K; failures (with their frames) and totals
  PYTHONPATH=/tmp/site:$PWD timeout ${2:-240} python3 -m pytest -q -m gpu -p no:cacheprovider tests/ -k "$1" 2>&1 \
    | grep -E "^E |passed|failed|\.py:[0-9]+" | tail -40 | tee -a "$OUT/gpu-tests.log"
}

case "$MODE" in
train)
  seed_fit
  for config in ${CONFIGS:-qlora-fast qlora-24gb qlora-16gb}; do
    flags=$([ "$config" = qlora-fast ] && echo "$FAST_FLAGS")
    for code in $(codes); do
      fit "$code" "$(label $code)-$config" "$config" "${STEPS:-15}" "$flags"
    done
  done
  ;;
memory)
  for budget in none 24 16; do
    flags=$([ $budget = none ] || echo "--model.compute.checkpoint_layers auto --model.compute.memory_budget_gib $budget")
    fit . "auto-$budget" qlora-24gb "${STEPS:-15}" "$flags"
  done
  ;;
plan|plan-long|plan-cost)  # each within 9 minutes on an H100 (the script skips what could not end in time, and says so)
  part=$(case $MODE in plan) echo budgets ;; plan-long) echo long ;; *) echo cost ;; esac)
  callbacks="--trainer.callbacks+=benchmarks.train.plan_passes.ShowPlanPasses"
  callbacks+=$([ -n "${CAP_MEMORY:-}" ] && echo " --trainer.callbacks+=benchmarks.train.cap_memory.CapMemory")
  PYTHONPATH=/tmp/site timeout 560 python3 benchmarks/train/bench_plan.py --model "$CKPT" --data $DATA --part $part \
    --long_steps ${LONG_STEPS:-200} --extra="$callbacks" ${ONLY:+--only $ONLY} ${BUDGETS:+--budgets $BUDGETS} \
    ${DEADLINE:+--deadline $DEADLINE} \
    | tee -a "$OUT/$MODE.jsonl"
  grep -h "model.compute plan:\|memory plan \|Time to the first\|CapMemory\|Error\|error" /tmp/bench-plan/*.log \
    | cut -c1-600 \
    | tee -a "$OUT/$MODE-logs.txt"
  ;;
big)
  BIG=/tmp/llama-2-70b && mkdir -p $BIG && cp benchmarks/train/architectures/llama-2-70b/config.json $BIG/ \
    && cp .bench/tokenizer/* $BIG/
  PYTHONPATH=/tmp/site timeout ${BIG_TIMEOUT:-560} python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA \
    --label llama-2-70b --fit qlora-24gb --steps ${STEPS:-8} --warm 3 --timeout $((${BIG_TIMEOUT:-560} - 20)) \
    --fit_flags="--model.name_or_path $BIG --model.random_init true ${BIG_FLAGS:-}" | tee -a "$OUT/$MODE.jsonl"
  grep -h "Loaded\|=auto\|Error\|error" /tmp/bench-cli/llama-2-70b/fit-*.log | cut -c1-300 | tail -5
  ;;
predict)
  # dolly-lengths: 1,000 prompts, answer i exactly min(L_i, 512) tokens (its own max_new_tokens)
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/predict/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA \
    --n 1000 --out /tmp/dolly-lengths.jsonl | tee -a "$OUT/$MODE.jsonl"
  for code in $(codes); do
    for run in qlora-fast:merged qlora-24gb:adapter; do
      PYTHONPATH=/tmp/site timeout 200 python3 benchmarks/bench_cli.py --model "$CKPT" --data $DATA --code $code \
        --label "$(label $code)-${run%%:*}" --predict ${run%%:*} --predict_file /tmp/dolly-lengths.jsonl --timeout 190 \
        --predict_flags "--model.generation.max_new_tokens 512 --model.generation.weights ${run##*:}" \
        | tee -a "$OUT/$MODE.jsonl"
    done
  done
  if [ -n "${PEERS:-}" ]; then
    PYTHONPATH=/tmp/site:$PWD timeout 200 python3 benchmarks/predict/bench_generate_peers.py --model "$CKPT" \
      --file /tmp/dolly-lengths.jsonl --tokenizer .bench/tokenizer | tee -a "$OUT/$MODE.jsonl"
    # seed_predict.py reads ../data/ next to itself: the ../shared layout rebuilt
    mkdir -p /tmp/seedbench/bench /tmp/seedbench/data && cp .bench/seed_predict.py /tmp/seedbench/bench/ \
      && cp $DATA /tmp/seedbench/data/ && cp -r .bench/tokenizer /tmp/seedbench/data/mistral-7b-v0.1-tokenizer
    (cd /tmp/seedbench/bench && timeout 120 python3 seed_predict.py 4 8 256) 2>&1 | grep "^{" | tee -a "$OUT/$MODE.jsonl"
  fi
  ;;
serve)
  if [ -d .whl-serve ]; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl-serve/*.whl || exit 1
  fi
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/predict/dolly_lengths.py --tokenizer .bench/tokenizer --data $DATA \
    --n 1000 --out /tmp/dolly-lengths.jsonl | tee -a "$OUT/$MODE.jsonl"
  for run in ${RUNS:-qlora-fast:merged}; do
    PYTHONPATH=/tmp/site timeout 540 python3 benchmarks/predict/bench_serve.py --model "$CKPT" \
      --file /tmp/dolly-lengths.jsonl --config ${run%%:*} --clients ${CLIENTS:-64 256} --predict --label "${run/:/-}" \
      --work "$OUT/serve-${run%%:*}" --flags "--model.generation.max_new_tokens 512 --model.generation.weights ${run##*:}" \
      --serve_flags "${SERVE_FLAGS:-}" | tee -a "$OUT/$MODE.jsonl"
  done
  if [ -n "${PEERS:-}" ]; then  # transformers' own server on the same base, under the same load on the first PEER_N
    PYTHONPATH=/tmp/site timeout ${PEER_S:-240} python3 benchmarks/predict/bench_serve.py --model "$CKPT" \
      --file /tmp/dolly-lengths.jsonl --n ${PEER_N:-1000} --peer transformers --clients ${PEER_CLIENTS:-256} \
      --label transformers-serve --work "$OUT/serve-transformers" | tee -a "$OUT/$MODE.jsonl"
  fi
  ;;
kernels)
  for code in $(codes); do  # one way of timing for both: this checkout's script over each checkout's kernels
    PYTHONPATH=/tmp/site:$PWD/$code timeout 120 python3 benchmarks/kernels/bench_lora_kernels.py ${KERNEL_ARGS:-} \
      | sed "s/^{/{\"code\": \"$(label $code)\", /" | tee -a "$OUT/$MODE.jsonl"
  done
  ;;
tests)
  gpu_tests "${TESTS:-}" 500
  ;;
inputs)  # where a pass with the recomputing layers' inputs in CPU memory takes its GPU memory (tiny model, seconds)
  PYTHONPATH=/tmp/site timeout 120 python3 benchmarks/train/probe_inputs.py | tee -a "$OUT/$MODE.jsonl"
  ;;
ddp)
  B="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/train/bench_ddp.py --model $CKPT --data $DATA --steps ${STEPS:-30} --timeout 200"
  CUDA_VISIBLE_DEVICES=0 $B --runs gpu1 gpu1_acc2 | tee -a "$OUT/$MODE.jsonl"
  $B --runs gpu2 | tee -a "$OUT/$MODE.jsonl"
  [ -n "${FSDP:-}" ] && $B --runs fsdp2 --timeout "${FSDP}" | tee -a "$OUT/$MODE.jsonl"
  ;;
fsdp-shared)
  B="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/train/bench_ddp.py --model $CKPT --data $DATA"
  $B --steps 4 --val_every 2 --warm 1 --timeout 200 --runs shared_fsdp_cpu shared_fsdp shared_ddp -- \
    --data.max_tokens 2048 --model.compute.gradient_checkpointing true | tee -a "$OUT/$MODE.jsonl"
  $B --steps 10 --val_every 5 --warm 2 --timeout 200 --runs fsdp1 fsdp1_cpu | tee -a "$OUT/$MODE.jsonl"
  for f in /tmp/bench-ddp/*.log; do
    grep -h "fsdp_qlora: sharded\|^Loaded\|Error\|error" "$f" | head -8 | sed "s|^|$(basename $f): |"
  done | tee "$OUT/fsdp-logs.txt"
  ;;
*)
  echo "unknown mode $MODE: train, memory, plan, plan-long, plan-cost, big, predict, serve, kernels, tests, inputs, ddp or fsdp-shared" >&2
  exit 2
  ;;
esac
