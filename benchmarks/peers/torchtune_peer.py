"""torchtune's `lora_finetune_single_device` recipe with its Mistral-7B QLoRA config and `compile: True`, on
lit_mistral's work.

Set up from torchtune's own config, `recipes/configs/mistral/7B_qlora_single_device.yaml` (in the torchtune wheel),
whose comments are its speed advice: `compile: True` ("torch.compile the model + loss, True increases speed +
decreases memory"), `dataset.packed: True` ("True increases speed"); the rest of the file as it is (NF4 through
torchao's NF4Tensor, activation checkpointing on, CEWithChunkedOutputLoss, fused AdamW, bf16). Changed to do the
same work as the other peers: LoRA r=8 / alpha 16 / dropout 0 on the seven projections (q, k, v, output_proj and the
MLP), lr 2e-4, weight decay 0.001, 10 warm-up steps of the cosine schedule, one pack per step, no accumulation, no
shuffling, and the checkpoint saved at the epoch's end left out (a benchmark keeps nothing).

The weights are the random Mistral-7B checkpoint every peer loads: torchtune's FullModelHFCheckpointer reads its
safetensors and config.json offline and converts the names itself. The packs are lit_mistral's batches, in order,
each padded to 16,384 tokens as torchtune's PackedDataset pads (pad id, ignored labels, positions counting on, the
padding as one more sequence), so that the compiled graph sees one shape; tokens/s counts the real tokens only.

    python benchmarks/peers/torchtune_peer.py --model /tmp/mistral7b-random [--dry-run]
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STATE: dict = {}  # the packs and the clock, handed to the components torchtune instantiates from the config


def pad_pack(step: dict, size: int, pad_id: int) -> dict:
    """One lit_mistral batch as a torchtune pack of `size` tokens (PackedDataset's padding)."""
    n = step["tokens"]
    positions = [p for length in step["seq_lengths"] for p in range(length)]
    last = positions[-1] + 1 if positions else 0
    pad = size - n
    return {"tokens": step["input_ids"] + [pad_id] * pad, "labels": step["labels"] + [-100] * pad,
            "input_pos": positions + [min(last + i, size - 1) for i in range(pad)],
            "seq_lens": step["seq_lengths"] + ([pad] if pad else [])}


def packs(tokenizer, **_):
    """The dataset component: lit_mistral's batches as torchtune packs (tensors, as PackedDataset yields)."""
    import torch

    class Packs(torch.utils.data.Dataset):
        packed = True

        def __len__(self):
            return len(STATE["packs"])

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in STATE["packs"][i].items()}

    return Packs()


class Recorder:
    """The metric logger component: each logged step (right after the step's loss is read back) to the clock."""

    def __init__(self, **_):
        pass

    def log_config(self, config):
        pass

    def log(self, name, data, step):
        pass

    def log_dict(self, payload, step):
        STATE["clock"].step_done()
        STATE["clock"].loss(step, payload["loss"])

    def close(self):
        pass


def recipes_dir() -> Path:
    """The `recipes` folder the torchtune wheel installs beside `torchtune` (not importable: torchtune's
    recipes/__init__.py refuses imports, `tune run` loads the files by path)."""
    import importlib.util

    return Path(importlib.util.find_spec("torchtune").origin).parents[1] / "recipes"


def recipe_class():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_finetune_single_device",
                                                  recipes_dir() / "lora_finetune_single_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LoRAFinetuneRecipeSingleDevice


def config(args, tokenizer_dir: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(recipes_dir() / "configs" / "mistral" / "7B_qlora_single_device.yaml"))
    index = Path(args.model, "model.safetensors.index.json")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = f"/tmp/torchtune-peer-{int(time.time())}"
    cfg = OmegaConf.merge(cfg, OmegaConf.create({
        "output_dir": out,
        "tokenizer": {"path": str(Path(tokenizer_dir, "tokenizer.model")), "max_seq_len": args.max_tokens},
        "dataset": {"_component_": "torchtune_peer.packs", "packed": True},
        "seed": common.SEED, "shuffle": False, "batch_size": 1, "gradient_accumulation_steps": 1, "epochs": 1,
        "max_steps_per_epoch": args.steps, "compile": True,
        "model": {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
                  "apply_lora_to_output": False, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "checkpointer": {"checkpoint_dir": args.model, "checkpoint_files": shards, "output_dir": out},
        "optimizer": {"lr": common.LEARNING_RATE, "weight_decay": common.WEIGHT_DECAY, "fused": True},
        "lr_scheduler": {"num_warmup_steps": common.WARMUP_STEPS},
        "metric_logger": {"_component_": "torchtune_peer.Recorder"},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
    }))
    return cfg


def main() -> None:
    p = common.parser(__doc__)
    args = p.parse_args()
    common.check(args)
    steps = common.batches(args)
    pad_id = 0  # torchtune's Mistral tokenizer: pad_id 0 (<unk>), as its PackedDataset pads
    STATE["packs"] = [pad_pack(s, args.max_tokens, pad_id) for s in steps]
    if args.dry_run:
        assert all(len(pk["tokens"]) == len(pk["input_pos"]) == args.max_tokens == sum(pk["seq_lens"])
                   for pk in STATE["packs"])
        common.dry_run("torchtune", args, steps, dict(mode="compile", pack_tokens=args.max_tokens))
        return
    import torch

    common.make_checkpoint(args.model, args.tokenizer)
    cfg = config(args, args.tokenizer or args.model)
    sys.modules.setdefault("torchtune_peer", sys.modules[__name__])  # the config's components see this STATE

    class Recipe(recipe_class()):
        def save_checkpoint(self, epoch):  # a benchmark keeps nothing (torchtune would write 14 GB here)
            pass

    STATE["clock"] = clock = common.Clock(steps)
    common.report_if_stopped("torchtune", "compile", args, clock)
    recipe = Recipe(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.train()
    except torch.OutOfMemoryError as err:
        common.oom_row("torchtune", "compile", args, clock, err)
        sys.exit(3)
    clock.report("torchtune", "compile", args, common.versions("torchtune", "torchao", "torchdata", "omegaconf"),
                 dict(compile=True, activation_checkpointing=cfg.enable_activation_checkpointing,
                      loss=cfg.loss._component_, lora_dropout=0.0, quantization="torchao NF4",
                      packed=f"padded to {args.max_tokens}"))


if __name__ == "__main__":
    main()
