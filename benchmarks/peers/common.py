"""What every peer script shares: the arguments, the work (the batches lit_mistral's `qlora-fast` trains on, in its
order), the random Mistral-7B checkpoint on disk, and the JSON line each run prints.

The batches come from lit_mistral's own data code (`InstructionDataModule` with `qlora-fast`'s data settings: the
Mistral prompt style, prompt masked, examples up to 2,048 tokens, padding-free packing within 16,384 tokens per
step, seed 42, epoch 0), over the training file `benchmarks/bench_cli.py` writes (Dolly records 0..199, tiled), so
step N of every peer sees the very tokens of lit_mistral's step N. Each batch is one packed row: `input_ids`,
`labels` (-100 on prompts and on each example's first token) and `seq_lengths` (the examples' lengths, in order)."""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # the process's start, for the time to the first step including imports
ROOT = Path(__file__).resolve().parents[2]
# Mistral-7B-v0.1's config.json (as .bench/seed_recipe.py writes it): the real architecture, random weights
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# qlora-fast's optimization settings, given to every peer
LEARNING_RATE, WEIGHT_DECAY, WARMUP_STEPS, SEED = 2e-4, 0.001, 10, 42


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("CKPT", os.path.join(tempfile.gettempdir(), "mistral7b-random")),
                   help="the random Mistral-7B checkpoint folder (written here first if missing; needs a GPU)")
    p.add_argument("--data", default=str(ROOT / ".bench" / "dolly-15k-head.jsonl"),
                   help="Dolly .jsonl with at least 200 records (records 0..199 are tiled, as bench_cli.py does)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: --model's, where the checkpoint has the Mistral tokenizer)")
    p.add_argument("--steps", type=int, default=25, help="optimizer steps (the learning-rate schedule spans them)")
    p.add_argument("--warm", type=int, default=5, help="steps left out of the median tokens/s")
    p.add_argument("--max_tokens", type=int, default=16384, help="tokens per packed step (qlora-fast's budget)")
    p.add_argument("--label", default="", help="names this run in the output")
    p.add_argument("--dry-run", action="store_true",
                   help="build the batches and print what each step holds, without a GPU or the peer's package")
    return p


def check(args: argparse.Namespace) -> None:
    """One clear error per bad argument, before anything loads."""
    problems = []
    if args.steps < 1 or args.warm < 0 or args.warm >= args.steps:
        problems.append(f"--steps {args.steps} --warm {args.warm}: expected 0 <= warm < steps")
    if args.max_tokens < 2048:
        problems.append(f"--max_tokens {args.max_tokens}: below the longest example (2,048 tokens)")
    if not Path(args.data).is_file():
        problems.append(f"--data {args.data}: no such file (copy ../shared/data/dolly-15k-head.jsonl there)")
    tokenizer = args.tokenizer or args.model
    if (args.tokenizer or args.dry_run) and not Path(tokenizer, "tokenizer.model").is_file():
        problems.append(f"--tokenizer {tokenizer}: no tokenizer.model there (../shared/data/mistral-7b-v0.1-tokenizer)")
    if problems:
        sys.exit("error: " + "; ".join(problems))


def batches(args: argparse.Namespace) -> list[dict]:
    """The first `args.steps` training batches of lit_mistral's `qlora-fast` over the tiled Dolly records, each as
    plain lists: `input_ids`, `labels`, `seq_lengths`, `tokens` (non-pad tokens), `labelled` (tokens with a loss)."""
    from lit_mistral.data.datamodule import InstructionDataModule

    rows = Path(args.data).read_text().splitlines()
    if len(rows) < 200:
        sys.exit(f"error: --data {args.data} has {len(rows)} records; expected at least 200")
    work = Path(tempfile.mkdtemp(prefix="peers-data-"))
    train = work / "train.jsonl"
    train.write_text("\n".join(rows[i % 200] for i in range(200 * 45)) + "\n")  # bench_cli.py's training file
    data = InstructionDataModule(path=str(train), prompt_style="mistral", mask_prompt=True, max_length=2048,
                                 packing=True, max_tokens=args.max_tokens, seed=SEED,
                                 tokenizer=args.tokenizer or args.model)
    data.setup("fit")
    out = []
    for batch in data.train_dataloader():
        bounds = batch["cu_seq_lens"].tolist()
        out.append({"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist(),
                    "seq_lengths": [b - a for a, b in zip(bounds, bounds[1:])], "tokens": batch["num_tokens"],
                    "labelled": int(batch["num_labels"]), "index": batch["index"]})
        if len(out) == args.steps:
            break
    if len(out) < args.steps:
        sys.exit(f"error: only {len(out)} batches in the data for --steps {args.steps}")
    return out


def dry_run(name: str, args: argparse.Namespace, steps: list[dict], extra: dict | None = None) -> None:
    """What each step holds (examples, tokens, the first examples' training-file positions), and a checksum of the
    tokens, so two peers' dry runs can be compared line by line."""
    import hashlib

    for i, b in enumerate(steps, 1):
        assert len(b["input_ids"]) == len(b["labels"]) == sum(b["seq_lengths"]) == b["tokens"]
        digest = hashlib.sha1(json.dumps(b["input_ids"]).encode()).hexdigest()[:12]
        print(json.dumps(dict(step=i, examples=len(b["seq_lengths"]), tokens=b["tokens"], labelled=b["labelled"],
                              first_examples=b["index"][:4], sha1=digest)))
    print(json.dumps(dict(peer=name, dry_run=True, steps=len(steps), tokens=sum(b["tokens"] for b in steps),
                          **(extra or {}))), flush=True)


def make_checkpoint(path: str, tokenizer: str | None) -> None:
    """Mistral-7B's architecture with random bf16 weights, written as a transformers checkpoint (safetensors) with
    the tokenizer beside it: what every peer loads and quantizes as it would the real weights."""
    if Path(path, "config.json").is_file():
        return
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(MistralConfig(**MISTRAL_7B)).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    source = Path(tokenizer or ROOT / ".bench" / "tokenizer")
    for f in source.iterdir():
        shutil.copy(f, path)


class Clock:
    """Per-step wall time (the GPU synchronized at each step's end), the loss of each step and the peak memory."""

    def __init__(self, steps: list[dict]) -> None:
        self.steps, self.ends, self.losses = steps, [], {}
        self.started = time.perf_counter()  # data ready, model not loaded: as lit_mistral's time to first step

    def step_done(self) -> None:
        import torch

        torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def loss(self, step: int, value: float) -> None:
        self.losses[step] = float(value)

    def report(self, peer: str, mode: str, args: argparse.Namespace, versions: dict, settings: dict) -> dict:
        import torch

        rates = [self.steps[i]["tokens"] / (self.ends[i] - self.ends[i - 1])
                 for i in range(max(args.warm, 1), len(self.ends))]
        gib = 2 ** 30
        row = dict(peer=peer, mode=mode, label=args.label, steps=len(self.ends), warm=args.warm,
                   tokens_per_s=round(statistics.median(rates)) if rates else None, steps_measured=len(rates),
                   peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2),
                   time_to_first_step_s=round(self.ends[0] - self.started, 1) if self.ends else None,
                   process_to_first_step_s=round(self.ends[0] - STARTED, 1) if self.ends else None,
                   loss_10=self.losses.get(10), loss_20=self.losses.get(20),
                   losses=[round(self.losses[s], 4) for s in sorted(self.losses)],
                   tokens_per_step=round(statistics.mean(b["tokens"] for b in self.steps)),
                   device=torch.cuda.get_device_name(0), versions=versions, settings=settings)
        print(json.dumps(row), flush=True)
        return row


def versions(*names: str) -> dict:
    """Installed versions of `names` (distribution names), as pip reports them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", *names):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def partial_row(peer: str, mode: str, args: argparse.Namespace, clock: "Clock", error: str, message: str) -> None:
    """The line of a run that stopped early (out of GPU memory, or SIGTERM from its time limit): how far it got, its
    speed until then (median over the steps after `--warm`, or over all after the first where fewer ran) and its
    peak memory, so a cut run still reports."""
    import torch

    ends = list(clock.ends)
    first = max(args.warm, 1) if len(ends) > args.warm + 1 else 1
    rates = [clock.steps[i]["tokens"] / (ends[i] - ends[i - 1]) for i in range(first, len(ends))]
    gib = 2 ** 30
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    print(json.dumps(dict(peer=peer, mode=mode, label=args.label, error=error, partial=True, steps_done=len(ends),
                          steps=args.steps, tokens_per_s_until_then=round(statistics.median(rates)) if rates else None,
                          steps_measured=len(rates),
                          peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 2) if cuda else None,
                          peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2) if cuda else None,
                          time_to_first_step_s=round(ends[0] - clock.started, 1) if ends else None,
                          seconds_since_data_ready=round(time.perf_counter() - clock.started, 1),
                          losses=[round(clock.losses[s], 4) for s in sorted(clock.losses)],
                          message=message.splitlines()[0][:300] if message else "")), flush=True)


def oom_row(peer: str, mode: str, args: argparse.Namespace, clock: "Clock", err: BaseException) -> None:
    """The line of a run that ran out of GPU memory."""
    partial_row(peer, mode, args, clock, "out of memory", str(err))


def report_if_stopped(peer: str, mode: str, args: argparse.Namespace, clock: "Clock") -> None:
    """On SIGTERM (run.sh's `timeout -s TERM`), print the partial line and exit 124, as `timeout` would: Python runs
    the handler in the main thread between bytecodes, so the allocator's peak counters are safe to read there."""
    import signal

    def stop(signum, frame):
        partial_row(peer, mode, args, clock, "time limit (SIGTERM)", f"stopped after {len(clock.ends)} of "
                    f"{args.steps} steps")
        sys.stdout.flush()
        os._exit(124)  # not SystemExit: a library's `except Exception`/`finally` must not run on in a cut run

    signal.signal(signal.SIGTERM, stop)


def sft_train(model, tokenizer, steps: list[dict], clock: Clock, args: argparse.Namespace, peft_config=None,
              **config) -> bool:
    """Train `model` with TRL's SFTTrainer (as imported now: Unsloth patches it in place) over `steps`, one packed
    row per step in order, through TRL's padding-free collator (`seq_lengths` give each example's positions, as
    TRL's own packing stores them). `peft_config`: the trainer's (SFTTrainer takes it, SFTConfig does not);
    `config`: the peer's SFTConfig settings. Returns whether the trainer kept padding-free batching on."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *_, **__):  # the steps in lit_mistral's order, not shuffled again
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            clock.step_done()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock.loss(state.global_step, logs["loss"])

    data = datasets.Dataset.from_list([{k: b[k] for k in ("input_ids", "labels", "seq_lengths")} for b in steps])
    # Every row is one pack of at most `max_tokens` tokens. Unsloth's SFTTrainer turns padding-free batching off for
    # a pre-tokenized split it cannot truncate to `max_length` (a packed split with `seq_lengths` and
    # skip_prepare_dataset is one) unless the split claims its own width in this attribute, which it believes when
    # the claim is at or below its `max_length` (unsloth/models/rl.py, `_TRUNCATION_ATTESTATION_ATTR`); it then sets
    # `max_length` to None and keeps padding-free. TRL alone never reads it.
    data._unsloth_truncated_to = max(len(b["input_ids"]) for b in steps)
    settings = dict(output_dir=tempfile.mkdtemp(prefix="peers-out-"), max_steps=len(steps),
                    per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=LEARNING_RATE,
                    weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP_STEPS, lr_scheduler_type="cosine",
                    optim="adamw_torch_fused", bf16=True, logging_steps=1, save_strategy="no", report_to="none",
                    seed=SEED, dataloader_num_workers=0, remove_unused_columns=False, padding_free=True,
                    packing=False, max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
    settings.update(config)
    trainer = InOrder(model=model, processing_class=tokenizer, train_dataset=data, args=SFTConfig(**settings),
                      callbacks=[Timer()], peft_config=peft_config)
    padding_free = bool(trainer.args.padding_free)  # after the trainer's (and Unsloth's) checks of the settings
    print(f"# trainer: padding_free={padding_free} max_length={trainer.args.max_length}", flush=True)
    trainer.train()
    return padding_free
