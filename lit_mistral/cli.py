"""`python -m lit_mistral fit|validate|predict --config ...`: LightningCLI over `QLoRAModule` and
`InstructionDataModule`, with shared settings linked, the run folder as the home of everything a run writes, and
bad input reported as one clear error (exit status 2) instead of a traceback."""

import os
import sys
import warnings
from pathlib import Path
from typing import Literal

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_mistral.checkpoint import SaveOnSigterm
from lit_mistral.checks import check_settings
from lit_mistral.data import InstructionDataModule
from lit_mistral.errors import LitMistralError, failure_message
from lit_mistral.model import DTYPES, QLoRAModule
from lit_mistral.predict import JsonlPredictionWriter, PredictionProgressBar

TRAINER_DEFAULTS = {
    "precision": "bf16-mixed",
    "log_every_n_steps": 1,
    "use_distributed_sampler": False,  # InstructionDataModule splits batches across ranks itself
    "num_sanity_val_steps": 0,
    # checkpoints written whole or not at all, and loaded without unpickling arbitrary objects
    "plugins": [{"class_path": "lit_mistral.checkpoint.AtomicCheckpointIO"}],
}


def find_last_checkpoint(root: str) -> Path | None:
    """The newest `last.ckpt` under `root/lightning_logs/version_*/checkpoints/`."""
    found = sorted(Path(root).glob("lightning_logs/version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class LitTrainer(Trainer):
    """Lightning's Trainer, plus `export` as a subcommand of the CLI."""

    def export(self, model: QLoRAModule, datamodule=None, ckpt_path: str | None = None, output_dir: str = "export",
               overwrite: bool = False, adapter: bool = False,
               dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16") -> Path:
        """Merge a trained adapter into the dequantized base and write a standard Hugging Face model folder.

        Args:
            ckpt_path: The `adapter` folder of a fit run, or one of its .ckpt files.
            output_dir: Folder to write: model safetensors + config + generation config + tokenizer, loadable by
                `AutoModelForCausalLM.from_pretrained` without lit_mistral.
            overwrite: Replace a non-empty `output_dir`.
            adapter: Also write the adapter alone, in peft's format, to `output_dir/adapter`.
            dtype: Dtype of the merged weights.
        """
        from lit_mistral.export import export

        written = export(model, ckpt_path, output_dir, DTYPES[dtype], self.strategy.root_device, overwrite, adapter)
        print(f"Exported the merged model to {written}")
        return written


class LitMistralCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        if config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, PredictionProgressBar()]
        try:
            return super()._instantiate_trainer(config, callbacks)
        except (ValueError, MisconfigurationException) as err:  # accelerator, strategy, devices, precision
            raise LitMistralError(f"trainer settings: {err} Fix: change the --trainer.* setting it names (nothing "
                                  "was loaded yet).") from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # set once, used by both: the tokenizer follows the model, the model knows the data's longest sequence
        parser.link_arguments("model.name_or_path", "data.tokenizer")
        parser.link_arguments("model.gguf_file", "data.gguf_file")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("data.max_length", "model.max_length")
        parser.link_arguments("model.max_new_tokens", "data.max_new_tokens")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "step{step:06d}",
                             "checkpoint.auto_insert_metric_name": False, "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")

    def before_instantiate_classes(self) -> None:
        # incompatible settings fail here, before the tokenizer, the data or the model load
        check_settings(str(self.subcommand), self._get(self.config, "model"), self._get(self.config, "trainer"))

    def before_fit(self) -> None:
        ckpt = self.config_init["fit"].get("ckpt_path")
        if ckpt is not None and Path(ckpt).is_dir():
            raise LitMistralError(f"fit --ckpt_path: {ckpt!r} is a folder. Fix: to resume, pass a .ckpt file or "
                                  "'last'; to start from a saved adapter, pass --model.adapter_path instead.")
        if ckpt == "last":
            root = self.trainer.default_root_dir
            last = find_last_checkpoint(root)
            if last is None:
                raise LitMistralError(f"fit --ckpt_path last: no last.ckpt under {root}/lightning_logs/. Fix: start "
                                      "without --ckpt_path, or set --trainer.default_root_dir to the earlier run's.")
            # resume in the same run folder, so the curves and checkpoints of the run stay together
            version = last.parent.parent.name.removeprefix("version_")
            self.trainer.loggers = [TensorBoardLogger(save_dir=root, version=int(version))]
            self.config_init["fit"]["ckpt_path"] = str(last)
        elif ckpt is not None and not Path(ckpt).is_file():
            raise LitMistralError(f"fit --ckpt_path: {ckpt!r} does not exist. Fix: check the path, or use 'last'.")

    def _evaluate_with(self, subcommand: str) -> None:
        ckpt = self.config_init[subcommand].get("ckpt_path")
        if ckpt is None:
            return
        if Path(ckpt).is_dir():  # a peft adapter folder: load it on the base instead of a Lightning checkpoint
            if not (Path(ckpt) / "adapter_config.json").is_file():
                raise LitMistralError(f"{subcommand} --ckpt_path: {ckpt!r} is a folder without adapter_config.json. "
                                      "Fix: pass a .ckpt file or the `adapter` folder of a fit run.")
            self.model.adapter_path = ckpt
            self.config_init[subcommand]["ckpt_path"] = None
        elif ckpt != "last" and not Path(ckpt).is_file():
            raise LitMistralError(f"{subcommand} --ckpt_path: {ckpt!r} does not exist. Fix: check the path.")

    def after_fit(self) -> None:
        # the comparison on the trained model, in the same run: the report lands next to the adapter, and its numbers
        # in the same TensorBoard run as the curves, at the last step
        if self.model.compare_base and not self.trainer.interrupted and self.datamodule.val_set is not None:
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def before_validate(self) -> None:
        self._evaluate_with("validate")
        if self.model.compare_base and self.model.adapter_path is None and self.config_init["validate"].get(
                "ckpt_path") is None:  # checked again by the model; here it stops before the run folder is made
            raise LitMistralError("validate --model.compare_base true: there is no adapter to compare with the base "
                                  "model. Fix: pass --ckpt_path with the `adapter` folder (or a .ckpt file) of a fit run.")

    def before_predict(self) -> None:
        self._evaluate_with("predict")


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m lit_mistral` and `lit-mistral`; `args` (for tests) replaces sys.argv[1:]."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # predict batches by prompt length on purpose; the writer restores input order (Lightning can't know that)
    warnings.filterwarnings("ignore", message="You are using a custom batch sampler .* for prediction")
    try:
        LitMistralCLI(
            QLoRAModule,
            InstructionDataModule,
            trainer_class=LitTrainer,
            auto_configure_optimizers=False,  # QLoRAModule configures its own (bitsandbytes) optimizer
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [SaveOnSigterm()]},
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except LitMistralError as err:
        print(f"lit_mistral: error: {err}", file=sys.stderr)
        sys.exit(2)
    except BaseException as err:  # SIGTERM, out of memory: a message with the way on instead of a traceback
        known = failure_message(err)
        if known is None:
            raise
        message, status = known
        print(f"lit_mistral: {message}", file=sys.stderr)
        sys.exit(status)
