"""`Evaluation`: what validation measures beyond the loss the LightningModule logs: the loss per category, greedy
answers scored against their references, the base model alongside (the adapter switched off), the report, and
answers logged to TensorBoard during fit. A Lightning callback: the training code does not know about it."""

import contextlib
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.checkpointing import stop_if_terminated
from lit_mistral.errors import LitMistralError, raise_problems
from lit_mistral.evaluation.metrics import SplitMetrics
from lit_mistral.evaluation.report import build_report, versions, write_report
from lit_mistral.generation.answering import answer_across

# the prefix of each column's metrics in the logs: "model" is the model as loaded (with its adapter), "base" the
# same model with the adapter switched off
COLUMNS = {"model": "val/", "base": "val_base/"}


class Evaluation(Callback):
    """Evaluation on the validation split, overall and per category (the records' `category`).

    Args:
        max_examples: Generation metrics: how many validation examples (the first) `validate` answers greedily and
            scores (ROUGE-L, exact match, contains-answer). 0: off.
        max_new_tokens: Generation metrics and samples: most new tokens per answer.
        batch_size: Prompts answered together.
        in_fit: Also compute generation metrics at every validation during `fit` (by default only `validate` does:
            generating costs far more than the loss).
        compare_base: `validate` also evaluates the base (adapter off) on the same examples, side by side in the
            report; needs `--ckpt_path`. With `fit`, the run ends with this comparison.
        report_examples: How many answers the report shows side by side (all are in evaluation.json).
        sample_every_n_val: During `fit`, every this-many validation runs, answer the first `num_samples` validation
            prompts greedily and log them to TensorBoard as text. 0: never.
        num_samples: How many validation prompts `sample_every_n_val` answers.
    """

    def __init__(self, max_examples: int = 64, max_new_tokens: int = 128, batch_size: int = 16, in_fit: bool = False,
                 compare_base: bool = False, report_examples: int = 3, sample_every_n_val: int = 0,
                 num_samples: int = 2) -> None:
        problems = [f"evaluation.{k}={v}: expected >= 1" for k, v in (("max_new_tokens", max_new_tokens),
                                                                        ("batch_size", batch_size)) if v < 1]
        problems += [f"evaluation.{k}={v}: expected >= 0" for k, v in (
            ("max_examples", max_examples), ("report_examples", report_examples),
            ("sample_every_n_val", sample_every_n_val), ("num_samples", num_samples)) if v < 0]
        raise_problems(problems, "Fix: correct these evaluation settings.")
        self.max_examples, self.max_new_tokens, self.batch_size = max_examples, max_new_tokens, batch_size
        self.in_fit, self.compare_base, self.report_examples = in_fit, compare_base, report_examples
        self.sample_every_n_val, self.num_samples = sample_every_n_val, num_samples
        self._metrics: dict[str, SplitMetrics] = {}  # column -> its metrics of this validation run
        self._examples, self._answered = [], []  # of this validation run
        self._runs = 0  # validation runs of this fit, for sample_every_n_val

    # -- per validation run ------------------------------------------------------------------------------------------

    def on_validation_start(self, trainer, pl_module) -> None:
        fn = trainer.state.fn
        comparing = self.compare_base and fn == "validate"
        trained = pl_module.global_step > 0  # validate right after fit (the CLI's compare_base): the adapter trained
        if comparing and pl_module.spec.adapter_path is None and trainer.ckpt_path is None and not trained:
            raise LitMistralError("evaluation.compare_base: there is no adapter to compare with the base model. Fix: "
                                  "pass --ckpt_path with the `adapter` folder (or a .ckpt file) of a fit run.")
        generating = (self.max_examples > 0 and not trainer.sanity_checking
                      and (fn == "validate" or (fn == "fit" and self.in_fit)))
        self._examples = list(getattr(trainer.datamodule, "val_examples", None) or [])
        self._answered = self._examples[: self.max_examples] if generating else []
        self._metrics = {column: SplitMetrics([e.category for e in self._examples],
                                              [e.category for e in self._answered], pl_module.device)
                         for column in (("model", "base") if comparing else ("model",))}

    def on_validation_batch_end(self, trainer, pl_module, outputs: dict, batch: dict, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        # batches carry each example's position in val_examples, and so its category
        categories = ([self._examples[i].category if i is not None else None for i in batch["index"]]
                      if self._examples and "index" in batch else None)
        self._metrics["model"].update_loss(outputs["sums"], outputs["counts"], categories)
        if "base" in self._metrics:
            with (self._adapter_state(pl_module, "base"), self._whole_root(trainer), self._forward_context(trainer),
                  torch.no_grad()):
                sums, counts = pl_module.example_losses(batch)
            self._metrics["base"].update_loss(sums, counts, categories)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        results, records, counts = {}, {}, {}
        for column, metrics in self._metrics.items():
            if self._answered:
                with self._adapter_state(pl_module, column):
                    records[column] = self._answer(trainer, pl_module, self._answered)
                metrics.score(records[column])
            results[column], counts = metrics.compute(), metrics.counts()
            metrics.reset()
        if "loss" not in results.get("model", {}):
            return  # no validation batches ran
        for column, values in results.items():
            for key, value in values.items():  # already reduced over processes by torchmetrics
                if column == "base" or key not in ("loss", "ppl"):  # the module logs the model's own
                    pl_module.log(COLUMNS[column] + key, value, sync_dist=False)
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, results, records, counts)
        elif trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._runs += 1
            boards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
            if (self.sample_every_n_val and self._runs % self.sample_every_n_val == 0 and self._examples
                    and self.num_samples and boards):
                shown = self._examples[: self.num_samples]
                done = records.get("model", [])  # in_fit has answered them already
                answers = done[: len(shown)] if len(done) >= len(shown) else self._answer(trainer, pl_module, shown)
                self._log_samples(trainer, boards, answers)

    # -- answering ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _adapter_state(pl_module, column: str):
        """`model`: the model as loaded (with its adapter); `base`: the same model with the adapter switched off."""
        return pl_module.model.disable_adapter() if column == "base" else contextlib.nullcontext()

    @staticmethod
    def _forward_context(trainer):
        """The precision context Lightning runs validation steps in (autocast under mixed precision): hooks run
        outside it."""
        return trainer.precision_plugin.forward_context()

    @staticmethod
    def _whole_root(trainer):
        """Under FSDP the weights of the root unit (embeddings, final norm, head) are whole only inside its forward,
        which Lightning runs around the step methods; generation from a hook runs outside it and gathers them. The
        decoder layers gather their own in their forward."""
        if not isinstance(trainer.strategy, FSDPStrategy):
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, recurse=False, writeback=False)

    def _answer(self, trainer, pl_module, examples: list) -> list[dict]:
        """Greedy answers of the model in its current adapter state to `examples`, split across processes and
        gathered (every process returns all of them), each with its example's reference and category."""
        items = trainer.datamodule.prompt_items(examples)
        # validate stops after the batch at hand on SIGTERM (fit leaves it to Lightning, at the next step)
        stop = (lambda: stop_if_terminated(trainer)) if trainer.state.fn == "validate" else None
        with self._forward_context(trainer):
            records = answer_across(pl_module.model, pl_module.tokenizer, items, self.batch_size, pl_module.generation,
                                    self.max_new_tokens, pl_module.device, trainer.global_rank, trainer.world_size,
                                    sharded=isinstance(trainer.strategy, FSDPStrategy),
                                    gathering=lambda: self._whole_root(trainer), between_batches=stop)
        return [dict(record, reference=e.response, category=e.category) for record, e in zip(records, examples)]

    # -- writing -----------------------------------------------------------------------------------------------------

    def _report(self, trainer, pl_module, results: dict, records: dict, counts: dict) -> None:
        """Write evaluation.json and evaluation.md into the run folder and log the Markdown to TensorBoard."""
        # trainer.log_dir is a collective call when several processes run: every rank asks, rank 0 writes
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        spec, step = pl_module.spec, pl_module.global_step
        adapter = spec.adapter_path or trainer.ckpt_path or (
            str(folder / "adapter") if step > 0 else None)  # right after fit: the adapter it saved
        info = {"model": spec.name_or_path, "gguf_file": spec.gguf_file, "adapter": str(adapter) if adapter else None,
                "quantize": spec.quantization.method, "global_step": step, "max_new_tokens": self.max_new_tokens,
                "val_examples": len(self._examples), "counts": counts,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": versions()}
        document, markdown = build_report(results, records, info, self.report_examples)
        json_path, md_path = write_report(folder, document, markdown)
        rank_zero_info(f"Wrote the evaluation report to {md_path} and {json_path.name}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("evaluation", markdown, global_step=step)

    @staticmethod
    def _log_samples(trainer, boards: list[TensorBoardLogger], records: list[dict]) -> None:
        """Log answers to fixed validation prompts as TensorBoard text, one tag per prompt (a slider over steps)."""
        if not trainer.is_global_zero:
            return
        for logger in boards:
            for i, record in enumerate(records):
                context = f"\n\n**Context:** {record['context']}" if record["context"] else ""
                text = (f"**Instruction:** {record['instruction']}{context}\n\n**Reference:** {record['reference']}"
                        f"\n\n**Step {trainer.global_step}** ({record['finish']}): "
                        f"{record['response'] or record.get('error', '')}")
                logger.experiment.add_text(f"samples/{i}", text, global_step=trainer.global_step)
