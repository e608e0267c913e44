#!/usr/bin/env bash
# The peers on lit_mistral's work, one GPU, from the repo root: benchmarks/peers/run.sh PEER [FLAGS...]
#   PEER: setup (install, the random checkpoint, each peer's imports: run it in the call before the others),
#         unsloth (its "unsloth" checkpointing), unsloth-nockpt, trl_liger (SFTConfig's default checkpointing),
#         trl_liger-nockpt, torchtune, all (unsloth, unsloth-nockpt, trl_liger, torchtune, each within its time limit),
#         lit_mistral (qlora-fast through the CLI on the same data and steps: as shipped, with dropout 0 as Unsloth and
#         torchtune train, and within Unsloth's memory, each a fresh process; LIT_RUNS="label:flags;..." replaces them)
#   FLAGS go to each script (--steps, --warm, --dry-run, ...). One JSON line per run on stdout (and $OUT/peers.jsonl).
# Needs, at the repo root (git-ignored, carried): .whl/ (bitsandbytes, liger-kernel, datasets, ...), .whl-peers/a, b (the
# peers' wheels), .bench/dolly-15k-head.jsonl and .bench/tokenizer/ (as run_gpu_round.sh has them).
# Installs once into /tmp/site (kept while the machine stays warm); the random checkpoint is written once to $CKPT.
set -uo pipefail
PEER=${1:?usage: benchmarks/peers/run.sh unsloth|unsloth-nockpt|trl_liger|trl_liger-nockpt|torchtune|all [FLAGS]}
shift
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
HERE=benchmarks/peers
if [ ! -f /tmp/site/.peers-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl-peers/a/*.whl .whl-peers/b/torchao-*.whl .whl-peers/b/torchtune-*.whl \
    .whl-peers/b/torchdata-*.whl .whl-peers/b/omegaconf-*.whl || exit 1
  # xformers' extension links libcudart.so.12; the image has CUDA 13's: the one library, kept out of /tmp/site
  # (an `nvidia` package there would hide the image's)
  mkdir -p /tmp/cu12 && unzip -q -j -o .whl-peers/b/nvidia_cuda_runtime_cu12-*.whl '*/libcudart.so.12' -d /tmp/cu12 \
    && touch /tmp/site/.peers-installed
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pycache HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 LD_LIBRARY_PATH=/tmp/cu12:${LD_LIBRARY_PATH:-} \
  CKPT=${CKPT:-/tmp/mistral7b-random} PATH=/tmp/site/bin:$PATH
DATA=(--data .bench/dolly-15k-head.jsonl --tokenizer .bench/tokenizer --model "$CKPT")
one() {  # SECONDS SCRIPT [ARGS...]: one run within its time limit; its JSON line to stdout and peers.jsonl, its log
  local limit=$1; shift
  local log="$OUT/$(echo "$*" | tr -c 'A-Za-z0-9_.-' '_').log"
  timeout "$limit" python3 "$HERE/$@" "${DATA[@]}" "${FLAGS[@]}" > "$log" 2>&1
  local rc=$?
  grep -h '^{\|^# unsloth' "$log" | tee -a "$OUT/peers.jsonl"
  [ $rc -eq 0 ] || { echo "{\"script\": \"$1 $*\", \"rc\": $rc, \"tail\": $(grep -v -i warn "$log" | tail -8 \
    | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()[-1500:]))')}" | tee -a "$OUT/peers.jsonl"; }
}
FLAGS=("$@")
case "$PEER" in
  unsloth) one 600 unsloth_peer.py --checkpointing unsloth ;;
  unsloth-nockpt) one 600 unsloth_peer.py --checkpointing false ;;
  trl_liger) one 600 trl_liger.py --checkpointing true ;;
  trl_liger-nockpt) one 600 trl_liger.py --checkpointing false ;;
  torchtune) one 600 torchtune_peer.py ;;
  setup)
    [ -f "$CKPT/config.json" ] || python3 -c "
import sys; sys.path.insert(0, '$HERE'); import common; common.make_checkpoint('$CKPT', '.bench/tokenizer')"
    python3 -c "import sys, unsloth, trl, liger_kernel, xformers.ops, torchtune, torchao, bitsandbytes, datasets
from unsloth.utils import attention_dispatch as a
print('flash_attn', a.HAS_FLASH_ATTENTION, 'xformers', a.HAS_XFORMERS)
sys.path.insert(0, '$HERE'); import torchtune_peer; torchtune_peer.recipe_class()" 2>&1 | grep -v -i warn | tail -5
    ls "$CKPT" ;;
  all)  # within 9 minutes once `setup` ran (each capped): each peer within its share, 20 steps unless FLAGS say otherwise
    [ ${#FLAGS[@]} -gt 0 ] || FLAGS=(--steps 20)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/peers.jsonl"
    one 150 unsloth_peer.py --checkpointing unsloth
    one 110 unsloth_peer.py --checkpointing false
    one 150 trl_liger.py --checkpointing true
    one 130 torchtune_peer.py ;;
  lit_mistral)  # bench_cli.py's training file is the one common.py builds: the same steps in the same order
    [ ${#FLAGS[@]} -gt 0 ] || FLAGS=(--steps 20)
    IFS=';' read -ra RUNS <<< "${LIT_RUNS:-fast:;fast-dropout0:--model.lora.dropout 0;budget8-dropout0:--model.lora.dropout 0 --model.compute.memory_budget_gib 8}"
    for run in "${RUNS[@]}"; do
      timeout 170 python3 benchmarks/bench_cli.py --model "$CKPT" --data .bench/dolly-15k-head.jsonl \
        --label "lit_mistral-${run%%:*}" --fit qlora-fast --warm 5 --timeout 160 "${FLAGS[@]}" \
        --fit_flags="${run#*:}" | tee -a "$OUT/peers.jsonl"
    done ;;
  *) echo "unknown peer $PEER"; exit 2 ;;
esac
