"""`Evaluation`, the validation callback: its settings checked together, the base model alongside (the adapter
switched off) on the same batches, the report in the run folder, and answers logged to TensorBoard every n
validations of a fit."""

import json

import pytest
import torch
from conftest import make_module, tensorboard, trainer

from lit_mistral.data.datamodule import InstructionDataModule
from lit_mistral.errors import LitMistralError
from lit_mistral.evaluation.callback import Evaluation

FLOAT32 = {"dtype": "float32", "gradient_checkpointing": False}


def data(tiny_model_dir, demo_file, **kw) -> InstructionDataModule:
    return InstructionDataModule(path=str(demo_file), tokenizer=str(tiny_model_dir), max_length=256, **kw)


def test_settings_are_checked_together():
    with pytest.raises(LitMistralError) as err:
        Evaluation(max_examples=-1, max_new_tokens=0, batch_size=0, num_samples=-2)
    assert str(err.value) == (
        "4 problems found:\n  evaluation.max_new_tokens=0: expected >= 1\n  evaluation.batch_size=0: expected >= 1\n"
        "  evaluation.max_examples=-1: expected >= 0\n  evaluation.num_samples=-2: expected >= 0\n"
        "Fix: correct these evaluation settings.")


def test_validate_puts_the_base_beside_the_adapter_and_writes_the_report(tiny_model_dir, adapter_dir, demo_file,
                                                                         tmp_path):
    module = make_module(tiny_model_dir, adapter_path=str(adapter_dir), compute=FLOAT32)
    dm = data(tiny_model_dir, demo_file, val_records=(40, 46), batch_size=4)
    evaluation = Evaluation(max_examples=3, max_new_tokens=3, batch_size=2, compare_base=True, report_examples=2)
    results = trainer(tmp_path, callbacks=[evaluation]).validate(module, dm, verbose=False)[0]

    # the base column: the same batches through the model with its adapter switched off
    module.build(torch.device("cpu")).model.eval()
    sums, counts = [], []
    with torch.no_grad(), module.model.disable_adapter():
        for batch in dm.val_dataloader():
            s, c = module.example_losses(batch)
            sums.append(s.sum()), counts.append(c.sum())
    assert results["val_base/loss"] == pytest.approx(float(sum(sums) / sum(counts)), rel=1e-5)
    assert results["val/loss"] != pytest.approx(results["val_base/loss"], rel=1e-3)
    assert {"val/rougeL", "val_base/rougeL", "val/exact_match", "val_base/contains"} <= set(results)

    report = json.loads((tmp_path / "evaluation.json").read_text())  # no logger: the run folder is the root
    assert report["adapter"] == str(adapter_dir) and report["global_step"] == 0
    assert report["counts"]["all"] == {"loss": 6, "generation": 3} and report["val_examples"] == 6
    assert report["metrics"]["base"]["loss"] == pytest.approx(results["val_base/loss"])
    assert report["metrics"]["fine-tuned"]["loss"] == pytest.approx(results["val/loss"])
    assert len(report["examples"]) == 3
    assert all(0 < e[column]["response_tokens"] <= 3 for e in report["examples"] for column in ("base", "fine-tuned"))
    assert "| category | n | metric | base | fine-tuned | change |" in (tmp_path / "evaluation.md").read_text()


def test_comparing_needs_an_adapter(tiny_model_dir, demo_file, tmp_path):
    module = make_module(tiny_model_dir, compute=FLOAT32)
    with pytest.raises(LitMistralError, match="evaluation.compare_base: there is no adapter to compare with the base "
                                              "model. Fix: pass --ckpt_path with the `adapter` folder"):
        trainer(tmp_path, callbacks=[Evaluation(compare_base=True)]).validate(
            module, data(tiny_model_dir, demo_file, val_records=(40, 44)), verbose=False)


def test_fit_logs_answers_every_n_validations(tiny_model_dir, demo_file, demo_records, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = make_module(tiny_model_dir, compute=FLOAT32)
    dm = data(tiny_model_dir, demo_file, train_records=(0, 8), val_records=(40, 44), batch_size=2)
    evaluation = Evaluation(sample_every_n_val=2, num_samples=2, max_new_tokens=2)
    trainer(tmp_path, logger=TensorBoardLogger(tmp_path, name="", version=0), max_steps=3, val_check_interval=1,
            callbacks=[evaluation]).fit(module, dm)
    scalars, texts = tensorboard(tmp_path / "version_0")
    assert [step for step, _ in scalars["val/loss"]] == [0, 1, 2]  # three validations, logged at the steps before
    assert sorted(texts) == ["samples/0", "samples/1"]  # the second validation's: at step 2
    for i in range(2):
        (step, text), = texts[f"samples/{i}"]
        record = demo_records[40 + i]
        context = f"\n\n**Context:** {record['context']}" if record["context"] else ""
        assert step == 2 and text.startswith(f"**Instruction:** {record['instruction']}{context}\n\n**Reference:** "
                                             f"{record['response']}\n\n**Step 2** (")
