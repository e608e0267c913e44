"""`export`: the trained adapter folded into the dequantized base, written as a standard Hugging Face model folder
(safetensors, config, generation config, tokenizer) that transformers, vLLM or TGI load without lit_mistral."""

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from lit_mistral.checkpointing import restore_adapter
from lit_mistral.errors import LitMistralError
from lit_mistral.io import writing_folder
from lit_mistral.modeling.adapters import check_adapter_folder, save_adapter
from lit_mistral.modeling.build import build_model
from lit_mistral.modeling.merge import merge_adapter
from lit_mistral.sources import drop_quantization_config


def check_output_dir(target: Path, overwrite: bool) -> None:
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise LitMistralError(f"export --output_dir: {str(target)!r} exists and is not empty. Fix: choose another "
                              "folder, or pass --overwrite true to replace it.")


def export_model(model, tokenizer, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` (a plain transformers model) and `tokenizer` as a standard Hugging Face folder (safetensors
    + config + generation config + tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without
    lit_mistral. Written under a temporary name next to the target, then renamed."""
    target = Path(output_dir)
    check_output_dir(target, overwrite)
    if not target.parent.is_dir():
        raise LitMistralError(f"export --output_dir: the folder {str(target.parent)!r} does not exist. "
                              "Fix: create it first.")
    with writing_folder(target) as tmp:
        # our attention implementation is registered at import time; a plain transformers process must not need it
        model.set_attn_implementation("sdpa")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        drop_quantization_config(tmp)
    return target


def export(module, ckpt_path: str, output_dir: str | os.PathLike, dtype: torch.dtype, device: torch.device,
           overwrite: bool = False, with_adapter: bool = False) -> Path:
    """Build `module`'s base with the trained adapter from `ckpt_path` (an adapter folder or a lit_mistral .ckpt),
    fold the adapter in, and write a plain Hugging Face model folder to `output_dir`."""
    if ckpt_path is None:
        raise LitMistralError("export needs --ckpt_path: the `adapter` folder of a fit run, or one of its .ckpt files.")
    path = Path(ckpt_path)
    target = Path(output_dir)
    check_output_dir(target, overwrite)  # before the expensive load
    spec = module.spec
    if path.is_dir():
        spec = replace(spec, adapter_path=str(check_adapter_folder(path, "export --ckpt_path")))
    elif not path.is_file():
        raise LitMistralError(f"export --ckpt_path: {ckpt_path!r} does not exist. Fix: check the path.")
    module.model, module.tokenizer = build_model(spec, device, training=False)
    if path.is_file():
        restore_adapter(module, path)
    adapter_copy = None
    if with_adapter:  # before merging: merging rewrites the adapted layers in place
        adapter_copy = save_adapter(module.model, module.tokenizer,
                                    Path(tempfile.mkdtemp(dir=target.parent if target.parent.is_dir() else None))
                                    / "adapter", module.spec.base_source())
    merged = merge_adapter(module.model, dtype)
    written = export_model(merged, module.tokenizer, target, overwrite=overwrite)
    if adapter_copy is not None:
        os.replace(adapter_copy, written / "adapter")
        shutil.rmtree(adapter_copy.parent, ignore_errors=True)
    return written
