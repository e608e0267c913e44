"""`python -m lit_mistral fit|validate|predict|export|serve|chat --config ...`: LightningCLI over `QLoRAModule` and
`InstructionDataModule`, with shared settings linked, the callbacks every run has, the run folder as the home of
everything a run writes, and bad input reported as one clear error (exit status 2) instead of a traceback."""

import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from lit_mistral.argument_errors import argument_problems, prog, renamed_options
from lit_mistral.callbacks import LearningRateMonitor, SaveAdapter, Telemetry
from lit_mistral.checkpointing import RandomState, SaveOnSigterm, StopOnSigterm, record_problems
from lit_mistral.checks import check_settings
from lit_mistral.config import DTYPES
from lit_mistral.data.datamodule import InstructionDataModule
from lit_mistral.errors import LitMistralError, failure_message, raise_problems
from lit_mistral.evaluation.callback import Evaluation
from lit_mistral.io import check_output_file, check_output_folder
from lit_mistral.modeling import prefetch
from lit_mistral.modeling.registry import register
from lit_mistral.module import QLoRAModule
from lit_mistral.predictions import JsonlPredictionWriter, ProgressBar
from lit_mistral.quiet import quiet_known_noise
from lit_mistral.runs import RunLogger, resolve_ckpt_path

TRAINER_DEFAULTS = {
    "precision": "bf16-mixed",
    "log_every_n_steps": 1,
    "use_distributed_sampler": False,  # InstructionDataModule splits batches across ranks itself
    "num_sanity_val_steps": 0,
    # checkpoints written whole or not at all, and loaded without unpickling arbitrary objects
    "plugins": [{"class_path": "lit_mistral.checkpointing.AtomicCheckpointIO"}],
}


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

    def serve(self, model: QLoRAModule, datamodule: InstructionDataModule | None = None, ckpt_path: str | None = None,
              host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              max_request_bytes: int = 1 << 20, grace_period: float = 30.0, max_rows: int | None = None,
              model_id: str | None = None) -> None:
        """Serve the model over HTTP in OpenAI's shape (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
        `/health`), every request on one continuous-batching engine, until SIGTERM or Ctrl+C.

        Args:
            ckpt_path: The `adapter` folder of a fit run, or one of its .ckpt files (None: the model as `--model.*`
                builds it, e.g. an `export` folder as `--model.name_or_path`).
            host: Address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 (any).
            port: Port to listen on.
            api_key: Requests to /v1/ must send `Authorization: Bearer <api_key>` (default: $LIT_MISTRAL_API_KEY;
                unset: no key asked).
            max_request_bytes: Largest request body; a larger one is refused (413) unread.
            grace_period: Seconds the requests in flight get to finish on SIGTERM or Ctrl+C (no new ones are
                taken) before they are cut.
            max_rows: Answers generated together at most (default: 256, or `model.generation.max_rows` if larger,
                over the cache `model.generation` sizes); more requests wait for a free row or free cache pages.
            model_id: The model's name in /v1/models and answers (default: the last part of `model.name_or_path`).
        """
        from lit_mistral import serve, serving

        model_id = model_id or Path(model.spec.name_or_path.rstrip("/")).name or "lit_mistral"
        rows = max_rows or max(serving.SERVE_ROWS, model.generation.max_rows)
        state = self._generation_state(model, datamodule, ckpt_path, rows,
                                       cache_rows=max_rows or model.generation.max_rows)
        server = serve.ServerState(state["loop"], state["prompter"], state["tokenizer"], state["model"], model_id,
                                   model.generation, api_key=serve.api_key_from(api_key))
        serving.warm_up(server.loop)
        serve.serve(server, host, port, max_request_bytes, grace_period)

    def chat(self, model: QLoRAModule, datamodule: InstructionDataModule | None = None, ckpt_path: str | None = None,
             system: str | None = None) -> None:
        """Chat with the model in the terminal: each line a user turn (typed, or piped in one per line), the answer
        streamed as it is generated, the conversation kept (its oldest exchanges dropped, with a notice, when it no
        longer fits). /reset clears it, /exit quits, Ctrl+C stops an answer. Sampling and the answer length are
        `model.generation`'s.

        Args:
            ckpt_path: The `adapter` folder of a fit run, or one of its .ckpt files (None: the model as
                `--model.*` builds it).
            system: A system message opening the conversation.
        """
        from lit_mistral.chat import Chat

        state = self._generation_state(model, datamodule, ckpt_path, rows=1)
        try:
            Chat(state["loop"], state["prompter"], state["tokenizer"], state["model"], model.generation, system).run()
        finally:
            state["loop"].close(timeout=5)

    def _generation_state(self, module: QLoRAModule, datamodule: InstructionDataModule | None, ckpt_path: str | None,
                          rows: int | None, cache_rows: int | None = None) -> dict:
        """The model loaded as predict loads it, on one engine loop (run under this trainer's precision), and
        prompts rendered as the data settings render them."""
        from lit_mistral import serving

        data = datamodule or InstructionDataModule()
        template = Path(data.chat_template).read_text(encoding="utf-8") if data.chat_template else None
        model, tokenizer = serving.load_for_generation(module, ckpt_path, self.strategy.root_device)
        prompter = serving.Prompter(data.prompt_style, tokenizer, template)
        single = rows == 1  # a chat: one row, as long as the model takes
        loop = serving.engine_loop(model, tokenizer, module.generation, module.max_length, rows,
                                   context=self.precision_plugin.forward_context, whole_context=single,
                                   cache_rows=cache_rows)
        return {"loop": loop, "prompter": prompter, "tokenizer": tokenizer, "model": model}


class LitMistralCLI(LightningCLI):
    """LightningCLI, with bad input (exit status 2) and runs stopped midway (SIGTERM: 143, Ctrl+C: 130, out of memory)
    reported as one message with the way on, instead of a traceback."""

    resumed_run: Path | None = None  # the run folder of the checkpoint `--ckpt_path last` found
    checkpoint_record: dict | None = None  # what the --ckpt_path file says it was trained with
    adapter_key: str | None = None  # "<subcommand> --ckpt_path" when that option gave an adapter folder
    subcommand: str | None = None  # set by LightningCLI once parsed: which advice fits a failure

    def __init__(self, *args, **kwargs) -> None:
        try:
            super().__init__(*args, **kwargs)
        except LitMistralError as err:
            print(f"lit_mistral: error: {err}", file=sys.stderr)
            sys.exit(2)
        except BaseException as err:  # SIGTERM, Ctrl+C, out of memory: a message with the way on
            callback = getattr(getattr(self, "trainer", None), "checkpoint_callback", None)
            plan = getattr(getattr(self, "model", None), "memory_plan", None)
            known = failure_message(err, self.subcommand, getattr(callback, "last_model_path", None) or None,
                                    getattr(plan, "line", None))
            if known is None:
                raise
            message, status = known
            print(f"lit_mistral: {message}", file=sys.stderr)
            sys.exit(status)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        skipped = {"model", "datamodule"}  # given by the CLI
        return {**LightningCLI.subcommands(), "export": skipped, "serve": skipped, "chat": skipped}

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        renamed = renamed_options(list(sys.argv[1:] if args is None else args))
        if renamed:
            raise LitMistralError("options renamed when the settings were grouped:\n"
                                  + "".join(f"  {r}\n" for r in renamed)
                                  + "Fix: use the new names (`--help` lists every option by group).")
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # the parser's message alone, with every bad key, not its usage first
            raise self.argument_error(str(err), list(sys.argv[1:] if args is None else args)) from None
        subcommand = self.config.get("subcommand")
        if subcommand is not None:  # before Lightning reads the checkpoint's hyperparameters (right after parsing)
            found = resolve_ckpt_path(subcommand, self.config[subcommand])
            self.resumed_run, self.checkpoint_record, self.adapter_key = found.run, found.record, found.adapter_key

    def argument_error(self, message: str, args: list[str]) -> LitMistralError:
        """One error for what the parser refused: every unknown key (file:line for a --config), the closest valid
        name of each, and the command that lists the options."""
        parsers = getattr(self, "_subcommand_parsers", {})
        subcommand = next((a for a in args if a in parsers), None)
        options = set(parsers[subcommand].get_defaults().keys()) if subcommand is not None else set()
        problems = argument_problems(message, args, subcommand, options)
        command = f"{prog()} {subcommand} --help" if subcommand is not None else f"{prog()} --help"
        noun = "problem" if len(problems) == 1 else "problems"
        return LitMistralError(f"{len(problems)} {noun} with the options:\n" + "".join(f"  {p}\n" for p in problems)
                               + f"Fix: correct {'it' if len(problems) == 1 else 'them'}; `{command}` lists every "
                               "option with its type and default.")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = self.config_init[str(self.subcommand)]["trainer"]
        if trainer.get("logger") in (None, True):  # Lightning's default logger, with the run folder claimed atomically
            kwargs["logger"] = RunLogger(save_dir=trainer.get("default_root_dir") or os.getcwd(),
                                         version=SLURMEnvironment.job_id())
        if trainer.get("enable_progress_bar") is not False:  # Lightning's bar, with its resume and predict additions
            callbacks = trainer.get("callbacks") or []
            kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]),
                                   ProgressBar()]
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as err:  # accelerator, strategy, devices, precision
            raise LitMistralError(f"trainer settings: {err} Fix: change the --trainer.* setting it names (nothing "
                                  "was loaded yet).") from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # set once, used by both: the tokenizer follows the model, the model knows the data's longest sequence
        parser.link_arguments("model.name_or_path", "data.tokenizer")
        parser.link_arguments("model.gguf_file", "data.gguf_file")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("data.max_length", "model.max_length")
        parser.link_arguments("model.generation.max_new_tokens", "data.max_new_tokens")
        parser.link_arguments("model.generation.max_rows", "data.predict_batch_size")  # prompts per predict batch
        parser.link_arguments("model.generation.max_cache_tokens", "data.predict_max_tokens")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "step{step:06d}",
                             "checkpoint.auto_insert_metric_name": False, "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(Evaluation, "evaluation")
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")

    def before_instantiate_classes(self) -> None:
        """Everything that can be checked on the parsed config, before the tokenizer, the data or the model load."""
        subcommand = str(self.subcommand)
        config = self.config[subcommand]
        check_settings(subcommand, config.model, config.trainer, config.get("data"), config.get("checkpoint"),
                       config.get("evaluation"))
        # outputs of the kind and in folders that take them (export checks its own, before it loads anything)
        if subcommand in ("fit", "validate", "predict"):
            check_output_folder(config.trainer.get("default_root_dir") or os.getcwd(), "trainer.default_root_dir")
        if subcommand == "fit" and config.checkpoint.get("dirpath"):
            dirpath = check_output_folder(config.checkpoint.dirpath, "checkpoint.dirpath")
            ckpt = config.get("ckpt_path")
            resuming = ckpt is not None and Path(ckpt).resolve().parent == dirpath.resolve()
            if dirpath.is_dir() and any(dirpath.glob("*.ckpt")) and not resuming:
                raise LitMistralError(f"checkpoint.dirpath: {str(dirpath)!r} holds the checkpoints of another run, "
                                      "whose last.ckpt this run would replace. Fix: choose an empty folder, or "
                                      "continue that run with --ckpt_path and its last.ckpt.")
        if subcommand == "serve":
            from lit_mistral.serve import api_key_from
            from lit_mistral.serve import check_settings as check_server

            check_server(config.host, config.port, api_key_from(config.api_key), config.max_request_bytes,
                         config.grace_period, config.max_rows)
        if subcommand == "predict" and config.predictions.get("path"):
            check_output_file(config.predictions.path, "predictions.path", "predictions.jsonl")
        if (subcommand == "validate" and config.evaluation.compare_base and config.get("ckpt_path") is None
                and config.model.adapter_path is None):
            raise LitMistralError("validate --evaluation.compare_base true: there is no adapter to compare with the "
                                  "base model. Fix: pass --ckpt_path with the `adapter` folder (or a .ckpt file) of a "
                                  "fit run.")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:  # the checks of Lightning's callbacks (ModelCheckpoint, ...)
            raise LitMistralError(f"callback settings: {str(err).rstrip('.')}. Fix: change the --checkpoint.* or "
                                  "--lr_monitor.* setting it names (nothing was loaded yet).") from None

    def after_instantiate_classes(self) -> None:
        """What needs the module built (not loaded): a checkpoint must fit its settings, which Lightning would find
        only after loading the base."""
        if self.adapter_key is not None:
            self.model.spec = replace(self.model.spec, adapter_key=self.adapter_key)
        if self.checkpoint_record is not None:
            raise_problems(record_problems(self.model.spec, self.checkpoint_record),
                           "Fix: run with the settings the checkpoint was trained with (its run folder holds "
                           "config.yaml); nothing was loaded yet.")

    def start_prefetch(self, training: bool) -> None:
        """Start importing what the model's build needs, in the background, before Lightning sets up the data: the
        imports overlap the tokenizing (`modeling/prefetch.py`)."""
        spec = self.model.spec
        prefetch.start(spec.compute.kernels, spec.quantization.method is not None,
                       isinstance(self.trainer.accelerator, CUDAAccelerator), training)

    def before_validate(self) -> None:
        self.start_prefetch(training=False)

    def before_predict(self) -> None:
        self.start_prefetch(training=False)

    def before_fit(self) -> None:
        self.start_prefetch(training=True)
        if self.resumed_run is None:
            return
        # `--ckpt_path last` resumes in the same run folder, so the curves and checkpoints of the run stay together
        version = self.resumed_run.name.removeprefix("version_")
        self.trainer.loggers = [RunLogger(save_dir=self.trainer.default_root_dir, version=int(version))]

    def after_fit(self) -> None:
        # the comparison on the trained model, in the same run: the report lands next to the adapter, and its numbers
        # in the same TensorBoard run as the curves, at the last step
        if (self.config_init["fit"]["evaluation"].compare_base and not self.trainer.interrupted
                and self.datamodule.val_set is not None):
            self.trainer.validate(self.model, datamodule=self.datamodule)


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m lit_mistral` and `lit-mistral`; `args` (for tests) replaces sys.argv[1:]."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_noise()
    # predict batches by prompt length on purpose; the writer restores input order (Lightning can't know that)
    warnings.filterwarnings("ignore", message="You are using a custom batch sampler .* for prediction")
    register()
    LitMistralCLI(
        QLoRAModule,
        InstructionDataModule,
        trainer_class=LitTrainer,
        auto_configure_optimizers=False,  # QLoRAModule configures its own (bitsandbytes) optimizer
        trainer_defaults={**TRAINER_DEFAULTS,
                          "callbacks": [SaveOnSigterm(), StopOnSigterm(), RandomState(), Telemetry(), SaveAdapter()]},
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        # errors come back as exceptions (`argument_error` reports them); usage names a command that can be run
        parser_kwargs={"exit_on_error": False, "prog": prog()},
        args=args,
    )
