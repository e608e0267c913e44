"""`export`: the trained adapter folded into the dequantized base, written as a standard Hugging Face model folder
(safetensors, config, generation config, tokenizer) that transformers, vLLM or TGI load without lit_mistral."""

import os
from collections.abc import Sequence
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path

import torch

from lit_mistral.checkpointing import restore_adapter
from lit_mistral.errors import LitMistralError
from lit_mistral.io import unwritable, writing_folder
from lit_mistral.modeling.adapters import check_adapter_folder, save_adapter
from lit_mistral.modeling.build import build_model
from lit_mistral.modeling.merge import merge_adapter
from lit_mistral.sources import drop_quantization_config, resolve_location

# what an export folder holds (transformers' model and tokenizer files, and `--adapter true`'s folder): `--overwrite`
# replaces only a folder of these, never a run folder, a base model's or anything else
EXPORT_NAMES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*-of-*.safetensors", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                "chat_template.jinja", "chat_template.json", "vocab.*", "merges.txt", "*.tiktoken", "adapter")


def check_output_dir(target: Path, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Before anything loads: `target` can receive the export. It is a new folder or an empty one, in a folder that
    exists and takes new files; a non-empty one only with `overwrite`, and only if it is an earlier export (nothing
    in it but what an export writes) holding none of `inputs` (the checkpoint and the base read)."""
    key = "export --output_dir"
    if target.exists() and not target.is_dir():
        raise LitMistralError(f"{key}: {str(target)!r} is a file. Fix: give a folder path (new, or an earlier "
                              "export with --overwrite true).")
    if not target.parent.is_dir():
        raise LitMistralError(f"{key}: the folder {str(target.parent)!r} does not exist. Fix: create it first.")
    why = unwritable(target.parent)  # the new folder is written next to the target, then renamed
    if why is not None:
        raise LitMistralError(f"{key}: the folder {str(target.parent)!r} is not writable ({why}). Fix: choose a "
                              "folder you can write to.")
    if not (target.is_dir() and any(target.iterdir())):
        return
    if not overwrite:
        raise LitMistralError(f"{key}: {str(target)!r} exists and is not empty. Fix: choose another folder, or pass "
                              "--overwrite true to replace an earlier export.")
    inside = [str(p) for p in map(Path, inputs) if target.resolve() in (p.resolve(), *p.resolve().parents)]
    if inside:
        raise LitMistralError(f"export --overwrite: {str(target)!r} holds {inside[0]!r}, which this export reads. "
                              "Fix: choose another --output_dir.")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir()
                     if not any(fnmatch(p.name, name) for name in EXPORT_NAMES))
    if foreign or not (target / "config.json").is_file():
        what = f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}" if foreign else "no config.json"
        raise LitMistralError(f"export --overwrite: {str(target)!r} is not an earlier export ({what}, which export "
                              "does not write); --overwrite replaces only exports. Fix: choose another --output_dir, "
                              "or move that folder away yourself.")


def write_model(model, tokenizer, folder: Path) -> None:
    """Write `model` (a plain transformers model) and `tokenizer` into `folder` as a standard Hugging Face folder
    (safetensors + config + generation config + tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without
    lit_mistral."""
    # our attention implementation is registered at import time; a plain transformers process must not need it
    model.set_attn_implementation("sdpa")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    drop_quantization_config(folder)


def export_model(model, tokenizer, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`write_model` into `output_dir`: written under a temporary name next to it, then renamed; an earlier export
    there is replaced (with `overwrite`) only once the new one is complete."""
    target = Path(output_dir)
    check_output_dir(target, overwrite)
    with writing_folder(target) as tmp:
        write_model(model, tokenizer, tmp)
    return target


def model_inputs(spec) -> list[Path]:
    """The local files and folders the base of `spec` is read from (none for a hub id)."""
    location = Path(resolve_location(spec.name_or_path))
    found = [location] if location.exists() else []
    if spec.gguf_file is not None:
        found.append(Path(spec.gguf_file) if Path(spec.gguf_file).is_absolute() else location / spec.gguf_file)
    return found


def export(module, ckpt_path: str, output_dir: str | os.PathLike, dtype: torch.dtype, device: torch.device,
           overwrite: bool = False, with_adapter: bool = False) -> Path:
    """Build `module`'s base with the trained adapter from `ckpt_path` (an adapter folder or a lit_mistral .ckpt),
    fold the adapter in, and write a plain Hugging Face model folder to `output_dir`: aside first, then renamed into
    place, so an earlier export there is replaced only by a complete one."""
    if ckpt_path is None:
        raise LitMistralError("export needs --ckpt_path: the `adapter` folder of a fit run, or one of its .ckpt files.")
    path = Path(ckpt_path)
    target = Path(output_dir)
    check_output_dir(target, overwrite, [path, *model_inputs(module.spec)])  # before the expensive load
    spec = module.spec
    if path.is_dir():
        spec = replace(spec, adapter_path=str(check_adapter_folder(path, "export --ckpt_path")),
                       adapter_key="export --ckpt_path")
    elif not path.is_file():
        raise LitMistralError(f"export --ckpt_path: {ckpt_path!r} does not exist. Fix: check the path.")
    module.model, module.tokenizer = build_model(spec, device, training=False)
    if path.is_file():
        restore_adapter(module, path)
    with writing_folder(target) as tmp:
        if with_adapter:  # before merging: merging rewrites the adapted layers in place
            save_adapter(module.model, module.tokenizer, tmp / "adapter", module.spec.base_source())
        write_model(merge_adapter(module.model, dtype), module.tokenizer, tmp)
    return target
