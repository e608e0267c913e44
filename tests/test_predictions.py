"""Predict's writer helpers without a run: which file `--predictions.overwrite` may replace, what resuming reads back
from an interrupted run (a cut-short last line dropped; a foreign row, or one made with other settings, refused),
the generation rate the writer reports and the bar shows, and the bar on a fit resumed mid-epoch. (The writer itself
runs in the predict journeys.)"""

import json

import pytest
from conftest import fit_checkpointed, make_module
from lightning.pytorch.callbacks import Callback

from lit_mistral.data.datamodule import InstructionDataModule
from lit_mistral.errors import LitMistralError
from lit_mistral.predictions import GenerationRate, ProgressBar, is_predictions, partial_path, read_done


def rows(*indexed: tuple[int, str], generation: dict | None = None) -> str:
    return "".join(json.dumps({"index": i, "instruction": text, **({"generation": generation} if generation else {})})
                   + "\n" for i, text in indexed)


def test_only_predictions_may_be_overwritten(tmp_path):
    path = tmp_path / "out.jsonl"
    for text, expected in [("", True), (rows((0, "a")), True), ('{"instruction": "a", "output": "b"}\n', False),
                           ("not json\n", False)]:
        path.write_text(text)
        assert is_predictions(path) is expected, text
    assert partial_path(path).name == "out.jsonl.partial"


def test_read_done_keeps_whole_rows_and_refuses_foreign_ones(tmp_path):
    path, inputs = tmp_path / "out.jsonl.partial", ["a", "b", "c"]
    path.write_text(rows((2, "c"), (0, "a")) + '{"index": 1, "instr')  # killed mid-line
    assert sorted(read_done(path, inputs)) == [0, 2]
    path.write_text(rows((0, "a"), (1, "x")))
    with pytest.raises(LitMistralError, match=r"out.jsonl.partial:2: this row does not belong to the current inputs"):
        read_done(path, inputs)
    path.write_text(rows((0, "a"), generation={"do_sample": True}))
    with pytest.raises(LitMistralError, match=r"model.generation.do_sample: the rows have True, this run False"):
        read_done(path, inputs, {"do_sample": False})
    assert list(read_done(path, inputs)) == [0]  # no settings to compare with: kept


def test_generation_rate_counts_rows_and_tokens():
    rate = GenerationRate()
    rate.start()
    rate.add([{"response_tokens": 3}, {"response_tokens": 5}])
    rate.add([{"response_tokens": 0}])
    assert (rate.rows, rate.tokens) == (3, 8)
    rows, tokens = rate.per_second()
    assert tokens == pytest.approx(rows * 8 / 3)
    assert "rows/s" in str(rate) and "new tokens/s" in str(rate)


class BarSeen(Callback):
    """What the training bar shows as each batch starts: (batches done, total, name), and where it started."""

    def __init__(self) -> None:
        self.seen, self.initial = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total, bar.desc))
        self.initial.append(bar.initial)


def test_progress_bar_of_a_run_resumed_mid_epoch_reads_as_the_uninterrupted_runs(tiny_model_dir, demo_file,
                                                                                 tmp_path):
    """Lightning skips the resumed epoch's `on_train_epoch_start`, where its bar takes its total: resumed at batch
    3 of 5, the bar still shows 3/5 of "Epoch 0" (not 3/? of "Training"), then the next epoch as usual; it starts
    at 3, so its rate and time left count only the batches this run trains on."""
    def fit(root, max_steps, ckpt_path=None) -> BarSeen:
        seen = BarSeen()
        dm = InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=256,
                                   batch_size=4, train_records=(0, 20))  # 5 batches an epoch
        fit_checkpointed(root, make_module(tiny_model_dir), dm, max_steps, ckpt_path, callbacks=[seen, ProgressBar()],
                         enable_progress_bar=True)
        return seen

    straight = fit(tmp_path / "a", max_steps=7)
    fit(tmp_path / "b", max_steps=3)
    resumed = fit(tmp_path / "b", max_steps=7, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert straight.seen[3] == (3, 5, "Epoch 0: ") and straight.seen[5] == (0, 2, "Epoch 1: ")  # max_steps=7
    assert resumed.seen == straight.seen[3:]
    assert resumed.initial[:2] == [3, 3]
