"""Settings that are each valid but fail together or on this machine (precision x optimizer x quantization, a GPU
that is not there, a bitsandbytes without CUDA), checked on the parsed config before anything is built. The checks
of one group alone live with that group (`config.py`'s `problems()`, `InstructionDataModule`, `Evaluation`)."""

import importlib.util
import re

import torch

from lit_mistral.errors import raise_problems

FP16_PRECISIONS = {"16", "16-mixed", "16-true"}
# what a fit logs that ModelCheckpoint can monitor: the module's losses, the Evaluation callback's metrics overall and
# per category (generation metrics only with evaluation.in_fit), LearningRateMonitor's `lr-<optimizer>`
GENERATION_METRICS = ("rougeL", "exact_match", "contains")
MONITORABLE = re.compile(rf"train/(loss|grad_norm)|val/([^/]+/)?(loss|ppl|{'|'.join(GENERATION_METRICS)})|lr-.+")


def target_device(accelerator) -> str | None:
    """`cuda` or `cpu`: where Lightning will run, as far as these checks care (None: another accelerator)."""
    if not isinstance(accelerator, str):
        return None
    accelerator = accelerator.lower()
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu" if accelerator == "cpu" else None


def bitsandbytes_has_cuda() -> bool:
    """Whether bitsandbytes loaded its CUDA library (it falls back to the CPU one when its build does not match)."""
    from bitsandbytes.cextension import lib

    return bool(getattr(lib, "compiled_with_cuda", True))  # unknown on other versions: let bitsandbytes decide


def check_settings(subcommand: str, model, trainer, data=None, checkpoint=None, evaluation=None) -> None:
    """Raise one `LitMistralError` listing every incompatible setting of `model`, `trainer` and, where given, `data`,
    `checkpoint` and `evaluation` (parsed config namespaces) for `subcommand`, each with its fix."""
    problems = []
    precision = str(trainer.get("precision"))
    quantize, optimizer = model.get("quantization.method"), model.get("optimization.optimizer")
    kernels = model.get("compute.kernels")
    accelerator = trainer.get("accelerator")
    device = target_device(accelerator)
    fit = subcommand == "fit"

    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"torch (CUDA {torch.version.cuda}) finds no device: check the driver and CUDA_VISIBLE_DEVICES")
        problems.append(f"trainer.accelerator={accelerator}: no CUDA GPU is usable ({why}). Fix: install a CUDA "
                        "build of torch, or run on the CPU with --trainer.accelerator cpu --trainer.precision 32-true.")
    elif device == "cuda":
        needs = [f"model.quantization.method={quantize}"] if quantize else []
        needs += [f"model.optimization.optimizer={optimizer}"] if fit and optimizer != "adamw" else []
        if needs and not bitsandbytes_has_cuda():
            problems.append(f"{' and '.join(needs)} on a GPU need bitsandbytes' CUDA library, but it loaded its CPU "
                            f"one (`python -m bitsandbytes` says why). Fix: install a bitsandbytes build for CUDA "
                            f"{torch.version.cuda} (pip install -U bitsandbytes), or set --model.quantization.method "
                            "null --model.optimization.optimizer adamw.")
    if fit and precision == "16-true" and optimizer == "adamw":
        problems.append("trainer.precision=16-true with model.optimization.optimizer=adamw: torch's AdamW on "
                        "float16 LoRA weights adds eps=1e-8, which is 0 in float16, so 0/0 turns the adapters NaN at "
                        "the second step. Fix: --trainer.precision bf16-mixed or 16-mixed (float32 adapters), or a "
                        "bitsandbytes optimizer (paged_adamw_32bit keeps its state in float32).")
    if fit and quantize and precision in FP16_PRECISIONS:
        problems.append(f"trainer.precision={precision} with model.quantization.method={quantize}: float16 matmuls "
                        "on a 4-bit base overflow in LoRA training (NaN losses, often thousands of steps in; the "
                        "reason model.compute.dtype=float16 is refused too). Fix: --trainer.precision bf16-mixed on "
                        "GPUs with bfloat16 (Ampere or newer), 32-true with --model.compute.dtype float32 on older "
                        "ones, or --model.quantization.method null.")
    if fit and kernels == "liger" and device != "cuda":  # off a GPU only fit applies them (see config.Compute)
        problems.append("model.compute.kernels=liger: Liger's Triton kernels run on CUDA GPUs only. Fix: set "
                        "--model.compute.kernels null on this machine.")
    elif fit and kernels == "liger" and importlib.util.find_spec("liger_kernel") is None:
        problems.append("model.compute.kernels=liger: Liger-Kernel is not installed. Fix: pip install liger-kernel, "
                        "or set --model.compute.kernels null.")
    every = trainer.get("check_val_every_n_epoch")
    if fit and every is not None and every < 1:
        problems.append(f"trainer.check_val_every_n_epoch={every}: expected >= 1, or null to validate every "
                        "trainer.val_check_interval batches across epochs. Fix: set it to 1 or more, or null.")
    if fit and checkpoint is not None and checkpoint.get("monitor"):
        problems += _monitor_problems(checkpoint.get("monitor"), data, evaluation)
    problems += _sharding_problems(subcommand, model, trainer, precision)
    raise_problems(problems, "Fix: change these settings as each line says; nothing was loaded yet.")


def _monitor_problems(monitor: str, data, evaluation) -> list[str]:
    """ModelCheckpoint looks for its `monitor` only at the first checkpoint, after training: a name that is never
    logged would stop the run then."""
    fix = "Fix: --checkpoint.monitor val/loss (or train/loss), or null to keep the last checkpoints."
    if not MONITORABLE.fullmatch(monitor):
        return [f"checkpoint.monitor={monitor}: a fit logs no such metric (it logs train/loss, val/loss, val/ppl, "
                f"val/<category>/loss, ...; with --evaluation.in_fit true also val/rougeL, ...). {fix}"]
    validating = data is None or (data.get("val_path") or data.get("val_records") or data.get("val_fraction"))
    if monitor.startswith("val/") and not validating:
        return [f"checkpoint.monitor={monitor}: there is no validation data, so it is never logged. Fix: add "
                "validation data (--data.val_path, --data.val_records or --data.val_fraction), or monitor train/loss."]
    in_fit = evaluation is None or evaluation.get("in_fit")
    if monitor.rsplit("/", 1)[-1] in GENERATION_METRICS and not in_fit:
        return [f"checkpoint.monitor={monitor}: generation metrics are computed during fit only with "
                "--evaluation.in_fit true. Fix: add it, or monitor val/loss."]
    return []


def _strategy_name(strategy) -> str:
    """`ddp`, `fsdp`, ... or a class path, for a strategy given as a name or as class_path/init_args."""
    if isinstance(strategy, str):
        return strategy
    return str(getattr(strategy, "class_path", None) or (strategy.get("class_path") if isinstance(strategy, dict)
                                                          else type(strategy).__name__))


def _sharding_problems(subcommand: str, model, trainer, precision: str) -> list[str]:
    from lit_mistral.modeling.fsdp import NAME

    strategy = _strategy_name(trainer.get("strategy"))
    ours = strategy == NAME or strategy.endswith("QLoRAFSDPStrategy")
    if not ours:
        if strategy in ("fsdp", "fsdp_cpu_offload") or strategy.endswith("FSDPStrategy"):
            return [(f"trainer.strategy={strategy}: Lightning's FSDP cannot shard a QLoRA model (it flattens the 4-bit "
                     "weights and the float32 adapters of a layer into one tensor, and casts the packed 4-bit "
                     f"storage). Fix: --trainer.strategy {NAME} (configs/qlora-fsdp.yaml).")]
        if model.get("load_on") == "cpu" and target_device(trainer.get("accelerator")) == "cuda":
            return [(f"model.load_on=cpu with trainer.strategy={strategy}: only {NAME} moves a base loaded on the CPU "
                     "to the GPU a layer at a time; here the whole base would move to each GPU, so loading on the "
                     f"CPU only makes it slower. Fix: --model.load_on device, or --trainer.strategy {NAME}.")]
        return []
    problems = []
    if subcommand in ("predict", "export", "serve", "chat"):
        problems.append(f"trainer.strategy={NAME} with {subcommand}: FSDP is for training, where it shards the "
                        "frozen base; generation would gather every layer for every new token. Fix: --trainer.strategy "
                        "ddp (several GPUs, each with the whole 4-bit base) or auto (one GPU).")
    if model.get("quantization.method") and model.get("quantization.storage") == "uint8":
        problems.append(f"model.quantization.storage=uint8 with trainer.strategy={NAME}: FSDP flattens a layer's "
                        "weights into one tensor of one dtype. Fix: --model.quantization.storage auto (the compute "
                        "dtype).")
    if precision not in ("bf16-mixed", "32-true", "32"):
        problems.append(f"trainer.precision={precision} with trainer.strategy={NAME}: supported are bf16-mixed (GPUs) "
                        "and 32-true. Fix: --trainer.precision bf16-mixed.")
    # `auto` settings are the plain ones under FSDP (modeling/plan.py: each GPU cannot measure alone)
    if subcommand == "fit" and model.get("compute.micro_batch_tokens") not in (None, "auto"):
        problems.append(f"model.compute.micro_batch_tokens with trainer.strategy={NAME}: FSDP reduces the gradients "
                        "at the end of every backward pass and expects one per step. Fix: auto or null (whole "
                        "batches); for less memory, lower --data.max_tokens and raise "
                        "--trainer.accumulate_grad_batches.")
    return problems
