"""LoRA adapters: checking that an adapter folder fits a base before loading it, loading it, the trainable weights
under their plain names (what checkpoints and adapter files hold under any strategy), and saving them in peft's
format."""

import json
import os
import pickle
import re
from pathlib import Path

import torch

from lit_mistral.errors import LitMistralError, unreadable
from lit_mistral.io import check_torch_file

WRAPPED = "_fsdp_wrapped_module."  # what FSDP units insert into parameter names


def check_adapter_folder(path: str | os.PathLike, key: str) -> Path:
    """`path` as a peft adapter folder whose files can be read, or one clear error naming `key` (the option that
    gave it) and the file: checked before the base loads, where peft would find a damaged file only after."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir() or not (folder / "adapter_config.json").is_file():
        what = "is a folder without adapter_config.json" if folder.is_dir() else "does not exist"
        raise LitMistralError(f"{key}: {str(path)!r} {what}. Fix: pass the `adapter` folder of a fit run (or, where "
                              "the option takes one, a .ckpt file).")
    fix = ("Fix: write the adapter again (fit writes it to the run's `adapter` folder at its end), or pass a .ckpt "
           "file of the run instead.")
    config = folder / "adapter_config.json"
    try:
        settings = json.loads(config.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise LitMistralError(f"{key}: {config}: not UTF-8 text (byte offset {err.start}). {fix}") from None
    except json.JSONDecodeError as err:
        raise LitMistralError(f"{key}: {config}:{err.lineno}: not valid JSON ({err.msg.removesuffix(' at')} at "
                              f"column {err.colno}). {fix}") from None
    if not isinstance(settings, dict) or "peft_type" not in settings:
        raise LitMistralError(f"{key}: {config} is not a peft adapter's config (it has no peft_type). {fix}")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        try:
            with safe_open(str(weights), "pt") as f:  # reads the header, which must cover the whole file
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except Exception as err:  # safetensors' own error type, raised for every kind of damage
            raise LitMistralError(f"{key}: {weights} cannot be read ({str(err).strip()}): cut short or damaged. "
                                  f"{fix}") from None
        wrong = rank_mismatches(settings, shapes)
        if wrong:  # peft would build the layers at the config's rank, then fail on a cut-off state_dict error
            rank = settings.get("r")
            raise LitMistralError(
                f"{key}: {config} says r={rank}, but {weights.name} holds LoRA weights of another rank: "
                f"{'; '.join(wrong[:3])}{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}. Fix: set r (and "
                "rank_pattern, if any) in adapter_config.json to the rank the adapter was trained with, or write "
                "the adapter again.")
    elif (folder / "adapter_model.bin").is_file():
        check_torch_file(folder / "adapter_model.bin", key, fix)
    else:
        raise LitMistralError(f"{key}: {folder} holds no adapter weights (adapter_model.safetensors). {fix}")
    return folder


def rank_mismatches(settings: dict, shapes: dict[str, tuple]) -> list[str]:
    """The LoRA weights (`shapes`: name -> shape, from the adapter's file) whose rank is not the one the adapter's
    config (`settings`: `r`, and `rank_pattern` for modules of their own rank) gives their module. The rank is the
    first axis of A ((r, in)) and the last of B ((out, r)), embeddings alike."""
    rank, patterns = settings.get("r"), settings.get("rank_pattern") or {}
    if not isinstance(rank, int):
        return []
    wrong = []
    for name, shape in shapes.items():
        path, _, part = name.removeprefix("base_model.model.").partition(".lora_")
        axis = {"A.weight": 0, "embedding_A": 0, "B.weight": -1, "embedding_B": -1}.get(part)
        if axis is None or len(shape) != 2:
            continue
        # peft's rank_pattern: a key matches a module whose path ends with it (a regular expression)
        expected = next((r for pattern, r in patterns.items() if re.fullmatch(rf"(.*\.)?{pattern}", path)), rank)
        if shape[axis] != expected:
            wrong.append(f"{name.removeprefix('base_model.model.')} is {list(shape)} (rank {shape[axis]}, "
                         f"not {expected})")
    return wrong


def adapter_mismatches(model, folder: str | os.PathLike) -> list[str]:
    """What keeps the peft adapter in `folder` from fitting the (unwrapped) `model`: target modules it lacks, adapter
    weights for modules it does not have, and weights whose shapes differ from its layers'. Read from the adapter's
    files without loading it: peft reports a shape mismatch one tensor at a time, and loads an adapter made for a
    deeper model of the same family without a word, leaving the extra layers' weights out."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    trained_on = f" (trained on {config['base_model_name_or_path']})" if config.get("base_model_name_or_path") else ""
    modules = dict(model.named_modules())
    problems = []
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression over full module names (or peft's "all-linear")
        if targets != "all-linear" and not any(re.fullmatch(targets, name) for name in modules):
            problems.append(f"target_modules {targets!r}{trained_on} matches no module of the base model")
    else:
        missing = [t for t in targets if t not in _leaf_names(model)]
        if missing:
            problems.append(f"target_modules {sorted(missing)}{trained_on} are not in the base model, whose linear "
                            f"layers are {linear_names(model)}")
    weights = folder / "adapter_model.safetensors"
    if problems or not weights.is_file():  # a .bin adapter is left to peft's own checks
        return problems
    absent, shapes = [], []
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            # base_model.model.<module path>.lora_A.weight (peft leaves the adapter name out of saved keys)
            path, _, part = key.removeprefix("base_model.model.").partition(".lora_")
            if not part:  # a fully saved module (modules_to_save, resized embeddings): its path is what matters
                path = re.sub(r"\.(base_layer|modules_to_save)\b.*|\.(weight|bias)$", "", path)
            module = modules.get(path)
            if module is None:
                absent.append(path)
                continue
            shape = tuple(f.get_slice(key).get_shape())
            expected = _lora_shape(module, part, shape)
            if expected is not None and expected != shape:
                shapes.append(f"{key.removeprefix('base_model.model.')}: adapter {list(shape)}, base layer needs "
                              f"{list(expected)}")
    if absent:
        absent = sorted(set(absent))
        problems.append(f"the adapter{trained_on} has weights for {len(absent)} module(s) the base model does not "
                        f"have, e.g. {absent[:3]}: it was made for a deeper or different model")
    if shapes:
        problems.append(f"{len(shapes)} adapter weight(s) have other shapes than the base model's layers{trained_on}, "
                        f"e.g. {'; '.join(shapes[:3])}")
    return problems


def _leaf_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def linear_names(model) -> list[str]:
    """The names of `model`'s linear layers (what LoRA can target)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) or hasattr(m, "in_features")})


def _lora_shape(module, part: str, shape: tuple) -> tuple | None:
    """The shape a LoRA factor (`A.weight`: (r, in), `B.weight`: (out, r); embeddings alike) must have on `module`,
    keeping the adapter's rank; None when there is nothing to compare."""
    if isinstance(module, torch.nn.Embedding):
        n_in, n_out = module.num_embeddings, module.embedding_dim
    else:
        n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if n_in is None or n_out is None or len(shape) != 2:
        return None
    if part in ("A.weight", "embedding_A"):
        return (shape[0], n_in)
    if part in ("B.weight", "embedding_B"):
        return (n_out, shape[1])
    return None


def check_targets(model, targets: list[str], name: str) -> None:
    """Every LoRA target names a module of `model` (the base `name`), or one error listing the choices."""
    missing = [t for t in targets if t not in _leaf_names(model)]
    if missing:
        raise LitMistralError(f"model.lora.target_modules: {missing} match no module of {name}. "
                              f"Fix: choose among {linear_names(model)}.")


def load_adapter(model, path: str, name: str, key: str = "model.adapter_path"):
    """`model` (the base `name`) with the peft adapter of folder `path` (given as the option `key`), trainable;
    refused with what does not fit."""
    from peft import PeftModel

    fix = "Fix: use the adapter with the base model it was trained on (its adapter_config.json names it)."
    problems = adapter_mismatches(model, path)
    if problems:
        raise LitMistralError(f"{key}: the adapter in {path!r} does not fit {name}:\n"
                              + "".join(f"  {p}\n" for p in problems) + fix)
    try:
        return PeftModel.from_pretrained(model, path, is_trainable=True)
    except pickle.UnpicklingError as err:  # peft reads a .bin adapter with torch.load(weights_only=True)
        raise unreadable(Path(path) / "adapter_model.bin", err) from None
    except (RuntimeError, ValueError, KeyError) as err:
        raise LitMistralError(f"{key}: the adapter in {path!r} does not fit {name} "
                              f"({str(err).splitlines()[0][:300]}). {fix}") from None


def clean_name(name: str) -> str:
    """A parameter's name as it is without FSDP (FSDP units insert `_fsdp_wrapped_module.` into the path)."""
    return name.replace(WRAPPED, "")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s trainable parameters (the adapters) by their names without FSDP, detached: whole on every process
    under any strategy here, so this is what checkpoints and adapter files hold."""
    return {clean_name(n): p.detach() for n, p in module.named_parameters() if p.requires_grad}


def save_adapter(peft_model, tokenizer, folder: str | os.PathLike, base: str, sharded: bool = False) -> Path:
    """Write `peft_model`'s adapter in peft's format (adapter_model.safetensors, adapter_config.json naming `base`)
    with the tokenizer, loadable by `peft.PeftModel.from_pretrained(base_model, folder)`; written whole or not at
    all. `sharded` (FSDP): peft's `save_pretrained` finds the adapter weights by module path, which FSDP units
    change, and would then gather the sharded base, so the replicated adapter weights are written by hand."""
    from lit_mistral.io import writing_folder

    folder = Path(folder)
    with writing_folder(folder) as tmp:
        config = peft_model.peft_config["default"]
        config.base_model_name_or_path = base
        if sharded:
            _save_adapter_files(peft_model, tmp)
        else:
            peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def _save_adapter_files(peft_model, folder: Path, adapter: str = "default") -> None:
    from safetensors.torch import save_file

    state = {n.replace(f".{adapter}.", "."): p.contiguous().cpu() for n, p in trainable_state(peft_model).items()}
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = peft_model.peft_config[adapter]
    training, config.inference_mode = config.inference_mode, True  # as peft saves it
    try:
        config.save_pretrained(folder)
    finally:
        config.inference_mode = training
