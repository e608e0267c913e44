#!/usr/bin/env bash
# The peers on lit_mistral's work, one GPU, from the repo root: benchmarks/peers/run.sh PEER [FLAGS...]
#   PEER: setup (install, the random checkpoint, each peer's imports: run it in the call before the others),
#         unsloth (its "unsloth" checkpointing), unsloth-nockpt, trl_liger (SFTConfig's default checkpointing),
#         trl_liger-nockpt, torchtune, litgpt (its finetune_lora's micro-batches of 1), litgpt-mb4 (of 4, padded),
#         unsloth-pair (unsloth and unsloth-nockpt), others (trl_liger and torchtune):
#         each pair within one 10-minute device call, each run within its time limit,
#         lit_mistral (qlora-fast through the CLI on the same data and steps: as shipped, with dropout 0 as Unsloth and
#         torchtune train, and within Unsloth's memory, each a fresh process; LIT_RUNS="label:flags;..." replaces them)
#   CAP: a single peer's time limit in seconds (default 540).
#   FLAGS go to each script (--steps, --warm, --dry-run, ...). One JSON line per run on stdout (and $OUT/peers.jsonl).
#   A run cut at its limit still prints its line ("partial": true, steps_done, tokens_per_s_until_then, peaks).
# Needs, at the repo root (git-ignored, carried): .whl/ (bitsandbytes, liger-kernel, datasets, ...), .whl-peers/a, b, c
# (the peers' wheels; c: `pip download --no-deps litgpt==0.5.13`), .bench/dolly-15k-head.jsonl and .bench/tokenizer/.
# Installs once into /tmp/site (kept while the machine stays warm); the random checkpoint is written once to $CKPT.
set -uo pipefail
USAGE="benchmarks/peers/run.sh setup|unsloth-pair|others|unsloth|unsloth-nockpt|trl_liger|trl_liger-nockpt|torchtune|litgpt"
PEER=${1:?usage: $USAGE|lit_mistral [FLAGS]}
shift
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
HERE=benchmarks/peers
if [ ! -f /tmp/site/.peers-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl-peers/a/*.whl .whl-peers/b/torchao-*.whl .whl-peers/b/torchtune-*.whl \
    .whl-peers/b/torchdata-*.whl .whl-peers/b/omegaconf-*.whl .whl-peers/c/litgpt-*.whl || exit 1
  # xformers' extension links libcudart.so.12; the image has CUDA 13's: the one library, kept out of /tmp/site
  # (an `nvidia` package there would hide the image's)
  # (with Python's zipfile: the GPU image has no unzip)
  mkdir -p /tmp/cu12 && python3 -c "import glob, zipfile
z = zipfile.ZipFile(glob.glob('.whl-peers/b/nvidia_cuda_runtime_cu12-*.whl')[0])
name = next(n for n in z.namelist() if n.endswith('/libcudart.so.12'))
open('/tmp/cu12/libcudart.so.12', 'wb').write(z.read(name))" && touch /tmp/site/.peers-installed
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pycache HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 LD_LIBRARY_PATH=/tmp/cu12:${LD_LIBRARY_PATH:-} \
  CKPT=${CKPT:-/tmp/mistral7b-random} PATH=/tmp/site/bin:$PATH
DATA=(--data .bench/dolly-15k-head.jsonl --tokenizer .bench/tokenizer --model "$CKPT")
one() {  # SECONDS SCRIPT [ARGS...]: one run within its time limit; its JSON line to stdout and peers.jsonl, its log
  # SIGTERM at the limit: the script prints its partial line (steps done, tokens/s so far, peak) and exits 124;
  # SIGKILL 30 s later if it is stuck where Python cannot run the handler
  local limit=$1; shift
  local log="$OUT/$(echo "$*" | tr -c 'A-Za-z0-9_.-' '_').log"
  timeout -s TERM -k 30 "$limit" python3 "$HERE/$@" "${DATA[@]}" "${FLAGS[@]}" > "$log" 2>&1
  local rc=$?
  grep -h '^{\|^# ' "$log" | tee -a "$OUT/peers.jsonl"
  [ $rc -eq 0 ] || python3 - "$log" "$rc" "$limit" "$*" <<'PY' | tee -a "$OUT/peers.jsonl"
import json, sys
log, rc, limit, script = sys.argv[1:]
lines = [l for l in open(log, errors="replace").read().replace("\r", "\n").splitlines() if "warn" not in l.lower()]
print(json.dumps({"script": script, "rc": int(rc), "limit_s": int(limit), "tail": "\n".join(lines[-8:])[-1500:]}))
PY
}
FLAGS=("$@")
case "$PEER" in
  unsloth) one ${CAP:-540} unsloth_peer.py --checkpointing unsloth ;;
  unsloth-nockpt) one ${CAP:-540} unsloth_peer.py --checkpointing false ;;
  trl_liger) one ${CAP:-540} trl_liger.py --checkpointing true ;;
  trl_liger-nockpt) one ${CAP:-540} trl_liger.py --checkpointing false ;;
  torchtune) one ${CAP:-540} torchtune_peer.py ;;
  litgpt) one ${CAP:-540} litgpt_peer.py ;;
  litgpt-mb4) one ${CAP:-540} litgpt_peer.py --micro_batch_size 4 ;;
  setup)
    [ -f "$CKPT/config.json" ] || python3 -c "
import sys; sys.path.insert(0, '$HERE'); import common; common.make_checkpoint('$CKPT', '.bench/tokenizer')"
    # LitGPT's checkpoint, converted once as `litgpt convert_to_litgpt` does (lit_model.pth beside the safetensors)
    [ -f "$CKPT/lit_model.pth" ] || python3 -c "from pathlib import Path
from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint
convert_hf_checkpoint(checkpoint_dir=Path('$CKPT'), model_name='Mistral-7B-v0.1')" 2>&1 | tail -1
    python3 -c "import sys, unsloth, trl, liger_kernel, xformers.ops, torchtune, torchao, bitsandbytes, datasets, litgpt
from unsloth.utils import attention_dispatch as a
print('flash_attn', a.HAS_FLASH_ATTENTION, 'xformers', a.HAS_XFORMERS)
sys.path.insert(0, '$HERE'); import torchtune_peer; torchtune_peer.recipe_class()" 2>&1 | grep -v -i warn | tail -5
    ls "$CKPT" ;;
  unsloth-pair|others)  # one device call each (under 9 minutes once `setup` ran): each run capped, 20 steps unless
    # FLAGS say otherwise; the caps leave room for Unsloth's and torchtune's compiling in the first step
    [ ${#FLAGS[@]} -gt 0 ] || FLAGS=(--steps 20)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/peers.jsonl"
    if [ "$PEER" = unsloth-pair ]; then
      one 270 unsloth_peer.py --checkpointing unsloth
      one 250 unsloth_peer.py --checkpointing false
    else
      one 300 trl_liger.py --checkpointing true
      one 220 torchtune_peer.py
    fi ;;
  all) echo "run.sh all: more than one device call holds; run \`setup\`, then \`unsloth-pair\` and \`others\` apart"
    exit 2 ;;
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
