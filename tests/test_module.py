"""The LightningModule on the real QLoRA path with a tiny random Mistral: bitsandbytes NF4 on CPU, peft LoRA,
Lightning's Trainer. Losses, optimizers and schedules, checkpoints that hold only the adapter, non-finite losses."""

import pytest
import torch
from conftest import make_module, trainer
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback

from lit_mistral.callbacks import SaveAdapter
from lit_mistral.checkpointing import RandomState
from lit_mistral.config import Optimization
from lit_mistral.data.batching import collate_packed, collate_padded
from lit_mistral.data.datamodule import InstructionDataModule
from lit_mistral.errors import LitMistralError
from lit_mistral.evaluation.callback import Evaluation
from lit_mistral.modeling.attention import packed_kwargs
from lit_mistral.module import optimizer_and_schedule


def make(tiny_model_dir, **settings):
    settings.setdefault("lora", {})
    settings["lora"].setdefault("dropout", 0.0)
    return make_module(tiny_model_dir, **settings)


def data(tiny_model_dir, path, **kw) -> InstructionDataModule:
    return InstructionDataModule(path=str(path), tokenizer=str(tiny_model_dir), max_length=256, **kw)


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw"])
@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_optimizers_and_warmup_schedules(optimizer, scheduler):
    params = [torch.nn.Parameter(torch.randn(64, 64))]
    config = optimizer_and_schedule(params, Optimization(optimizer=optimizer, lr_scheduler=scheduler,
                                                         warmup_ratio=0.25, learning_rate=1e-3), total_steps=8)
    optimizer_, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    # CPU parameters: the paged optimizers unpaged (paging is between GPU and CPU memory)
    assert type(optimizer_).__name__ == {"paged_adamw_32bit": "AdamW32bit", "paged_adamw_8bit": "AdamW8bit",
                                         "adamw_8bit": "AdamW8bit", "adamw": "AdamW"}[optimizer]
    lrs = []
    for _ in range(8):
        lrs.append(optimizer_.param_groups[0]["lr"])
        params[0].grad = torch.ones_like(params[0])
        optimizer_.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # 2 warmup steps (ratio 0.25 of 8)
    if scheduler == "constant":
        assert lrs[2:] == pytest.approx([1e-3] * 6)
    else:
        assert lrs[3] < 1e-3 and lrs[-1] < lrs[3]  # decays after warmup


def test_bad_model_settings_collected_in_one_error(tmp_path):
    with pytest.raises(LitMistralError, match=r"3 problems found:(.|\n)*lora.r=0(.|\n)*lora.dropout=1.5(.|\n)*float16"):
        make_module(tmp_path, lora={"r": 0, "dropout": 1.5}, compute={"dtype": "float16"})


def test_loss_matches_transformers_and_packing_changes_nothing(tiny_model_dir, demo_file):
    """The chunked head loss equals transformers' own loss, and packing the same examples in one row gives the
    same loss and the same per-example hidden states: no attention crosses an example boundary."""
    dm = data(tiny_model_dir, demo_file)
    dm.setup("fit")
    module = make(tiny_model_dir, quantization={"method": None},
                  compute={"gradient_checkpointing": False, "loss_chunk_size": 16}).build(torch.device("cpu"))
    module.model.eval()
    items = [dm.train_set[i] for i in range(5)]
    padded, packed = collate_padded(items, dm.tokenizer.pad_token_id), collate_packed(items)
    with torch.no_grad():
        loss_padded, n_padded = module.loss_sum(padded)
        loss_packed, n_packed = module.loss_sum(packed)
        reference = module.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                 labels=padded["labels"]).loss
        decoder = module.model.get_base_model().get_decoder()
        hidden_packed = decoder(input_ids=packed["input_ids"],
                                **packed_kwargs(packed, module.model.config._attn_implementation)).last_hidden_state[0]
        bounds = packed["cu_seq_lens"].tolist()
        for i, item in enumerate(items):
            alone = decoder(input_ids=torch.tensor([item["input_ids"]])).last_hidden_state[0]
            torch.testing.assert_close(hidden_packed[bounds[i]: bounds[i + 1]], alone, atol=1e-5, rtol=1e-5)
    assert n_padded == n_packed
    torch.testing.assert_close(loss_padded / n_padded, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-4, rtol=1e-5)


def test_tiny_model_trains_and_loss_falls(tiny_model_dir, demo_file, tmp_path):
    seed_everything(0)
    module = make(tiny_model_dir,
                  optimization={"learning_rate": 3e-2, "optimizer": "adamw", "lr_scheduler": "constant"},
                  lora={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                           "lm_head"]})
    dm = data(tiny_model_dir, demo_file, train_records=(0, 8), val_records=(0, 8), val_path=str(demo_file),
              batch_size=4)
    trainer(tmp_path, max_steps=30, limit_val_batches=0).fit(module, dm)
    val = trainer(tmp_path).validate(module, dm, verbose=False)[0]
    assert val["val/loss"] < 0.6 * 7.6  # from ~ln(vocab) = 7.6 for random weights
    assert val["val/ppl"] == pytest.approx(torch.tensor(val["val/loss"]).exp().item(), rel=1e-5)
    # a stand-alone validate releases the model at its end and keeps the trained adapter; the next run rebuilds it
    assert module.model is None and module.kept_adapter is not None
    again = trainer(tmp_path).validate(module, dm, verbose=False)[0]
    assert again["val/loss"] == pytest.approx(val["val/loss"], rel=1e-6) and module.kept_adapter is not None


def test_predict_releases_the_merged_copy_and_keeps_the_adapter(tiny_model_dir, demo_file, tmp_path):
    """Predict folds the adapter into a copy of the base and frees it at the end (Lightning's teardown would copy it
    to the CPU); the module used again rebuilds the base with the same adapter: the same answers, the same loss."""
    seed_everything(0)
    module = make(tiny_model_dir).build(torch.device("cpu"))
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (B is zero when fresh)
    adapter = {k: v.clone() for k, v in module.state_dict().items() if "lora_" in k}
    dm = data(tiny_model_dir, demo_file, val_records=(0, 8), val_path=str(demo_file), predict_path=str(demo_file),
              predict_batch_size=4, max_new_tokens=4)
    answers = []
    for _ in range(2):
        rows = trainer(tmp_path).predict(module, dm)
        answers.append([(r["index"], r["response"]) for batch in rows for r in batch])
        assert module.model is None and module.predictor is None
    assert answers[0] == answers[1] and len(answers[0]) == len(dm.predict_set)
    for key, value in adapter.items():
        assert torch.equal(module.kept_adapter[key], value), key
    trainer(tmp_path).validate(module, dm, verbose=False)  # rebuilt with the kept adapter, released again
    for key, value in adapter.items():
        assert torch.equal(module.kept_adapter[key], value), key


def test_first_losses_pinned(tiny_model_dir, demo_file, tmp_path):
    """Fixed seed, fixed data, real NF4 + paged AdamW path: the first losses are these numbers."""
    seed_everything(42)
    module = make(tiny_model_dir, optimization={"learning_rate": 5e-3})
    dm = data(tiny_model_dir, demo_file, train_records=(0, 16))
    losses = []

    class LossLog(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(round(float(outputs["loss"]), 4))

    trainer(tmp_path, max_steps=4, callbacks=[LossLog()]).fit(module, dm)
    assert losses == pytest.approx([7.0711, 7.0355, 7.0191, 7.0498], abs=2e-4)


class LossLog:
    """Collects (global_step, loss) of every training step."""

    def __new__(cls, losses: list):
        class _LossLog(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append((trainer.global_step, float(outputs["loss"])))

        return _LossLog()


def adapter_state(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class StopAt:
    """Stops training after `step` optimizer steps, as an interruption would (the schedule still spans max_steps)."""

    def __new__(cls, step: int):
        class _StopAt(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step >= step:
                    trainer.should_stop = True

        return _StopAt()


def run(tiny_model_dir, demo_file, tmp_path, max_steps, ckpt_path=None, every=None, losses=None, stop_at=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(7)
    module = make(tiny_model_dir, lora={"dropout": 0.1},  # dropout: the RNG must resume too (RandomState)
                  optimization={"learning_rate": 5e-3})
    dm = data(tiny_model_dir, demo_file, train_records=(0, 20), batch_size=4)  # 5 batches per epoch
    callbacks = [LossLog(losses if losses is not None else []), RandomState(), SaveAdapter()]
    callbacks += [StopAt(stop_at)] if stop_at else []
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_last=True,
                                         save_top_k=-1, filename="step{step}", auto_insert_metric_name=False))
    trainer(tmp_path, max_steps=max_steps, enable_checkpointing=bool(every), callbacks=callbacks).fit(
        module, dm, ckpt_path=ckpt_path)
    return module


def test_checkpoint_holds_only_the_adapter_and_resume_continues_the_same_run(tiny_model_dir, demo_file, tmp_path):
    straight_losses, resumed_losses = [], []
    straight = run(tiny_model_dir, demo_file, tmp_path / "a", max_steps=8, losses=straight_losses)
    run(tiny_model_dir, demo_file, tmp_path / "b", max_steps=8, every=3, stop_at=3)  # mid-epoch: batch 3 of 5
    ckpt_file = tmp_path / "b" / "ckpt" / "step3.ckpt"
    checkpoint = torch.load(ckpt_file, weights_only=True)  # no pickled objects: safe to load
    assert set(checkpoint["state_dict"]) == set(adapter_state(straight))
    adapter_bytes = sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values())
    assert ckpt_file.stat().st_size < 3 * adapter_bytes + 100_000  # adapter + 2 Adam moments, not the base
    assert {"optimizer_states", "lr_schedulers", "loops", "rng", "lit_mistral"} <= set(checkpoint)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run(tiny_model_dir, demo_file, tmp_path / "b", max_steps=8, ckpt_path=ckpt_file,
                      losses=resumed_losses)
    # the loader resumes (the batch plan skips what was trained on): no "not resumable ... unreliable results"
    assert not [w for w in caught if "not resumable" in str(w.message)]
    # CPU, fixed seed: the resumed run continues bitwise where the straight run went
    assert resumed_losses == straight_losses[3:]
    for name, value in adapter_state(straight).items():
        assert torch.equal(value, adapter_state(resumed)[name]), name


def test_checkpoint_from_other_settings_is_refused(tiny_model_dir, demo_file, tmp_path):
    run(tiny_model_dir, demo_file, tmp_path, max_steps=1, every=1)
    module = make(tiny_model_dir, lora={"r": 4})
    dm = data(tiny_model_dir, demo_file, train_records=(0, 20), val_records=(20, 24))
    with pytest.raises(LitMistralError, match=r"model.lora.r: checkpoint has 8, this run has 4"):
        trainer(tmp_path).validate(module, dm, ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)


def test_adapter_loads_with_plain_peft_and_gives_the_same_logits(tiny_model_dir, demo_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    module = run(tiny_model_dir, demo_file, tmp_path, max_steps=2)
    folder = tmp_path / "adapter"
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                   "tokenizer_config.json"}
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    plain = PeftModel.from_pretrained(base, folder).eval()
    for layer in plain.modules():  # on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights for inference and
        if hasattr(layer, "support_avx512bf16_for_cpu"):  # multiplies in another precision: compare like with like
            layer.support_avx512bf16_for_cpu = False
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, module.model(input_ids=ids).logits)
        # and the adapter is not a no-op
        with plain.disable_adapter():
            assert not torch.allclose(plain(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_example_losses_split_the_loss_by_example(tiny_model_dir, demo_file):
    """Per-example loss sums (what per-category validation metrics add up) are each example's own loss, the same
    from a padded batch and from a packed row, and add up to the batch loss."""
    dm = data(tiny_model_dir, demo_file)
    dm.setup("fit")
    module = make(tiny_model_dir, quantization={"method": None}, compute={"gradient_checkpointing": False})
    module.build(torch.device("cpu"))
    module.model.eval()
    items = [dm.train_set[i] for i in range(4)]
    with torch.no_grad():
        sums_padded, counts_padded = module.example_losses(collate_padded(items, dm.tokenizer.pad_token_id))
        sums_packed, counts_packed = module.example_losses(collate_packed(items))
        total, n = module.loss_sum(collate_padded(items, dm.tokenizer.pad_token_id))
        alone = [module.loss_sum(collate_padded([it], dm.tokenizer.pad_token_id)) for it in items]
    assert counts_padded.tolist() == counts_packed.tolist() == [int(c) for _, c in alone]
    assert counts_padded.tolist() == [sum(end - start for start, end in it["spans"]) for it in items]
    torch.testing.assert_close(sums_padded, torch.stack([s for s, _ in alone]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sums_packed, sums_padded, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sums_padded.sum(), total, atol=1e-4, rtol=1e-5)
    assert int(counts_padded.sum()) == int(n)


def test_val_ppl_is_torchmetrics_perplexity_of_the_responses(tiny_model_dir, demo_file, tmp_path):
    from torchmetrics.text import Perplexity

    module = make(tiny_model_dir)
    dm = data(tiny_model_dir, demo_file, val_records=(40, 52), batch_size=5)
    val = trainer(tmp_path, callbacks=[Evaluation(max_examples=0)]).validate(module, dm, verbose=False)[0]
    module.build(torch.device("cpu"))  # validate released the model (`QLoRAModule.release`); the same weights again
    reference = Perplexity(ignore_index=-100)
    with torch.no_grad():
        for batch in dm.val_dataloader():  # the full (B, T, V) logits, that the chunked loss never builds
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            reference.update(logits[:, :-1].float(), batch["labels"][:, 1:])
    assert val["val/ppl"] == pytest.approx(float(reference.compute()), rel=1e-4)
    # the per-category losses are there too, and average (token-weighted) to the overall one
    categories = {e.category for e in dm.val_examples}
    assert {f"val/{c}/loss" for c in categories} <= set(val)


def poison_loss(module, at_batch: int, value: float) -> None:
    """Make the training loss of one batch non-finite, as an overflow would, without touching the weights."""
    original, calls = module.loss_sum, iter(range(10**6))

    def loss_sum(batch):
        loss, count = original(batch)
        return (loss * value if next(calls) == at_batch else loss), count

    module.loss_sum = loss_sum


def test_nonfinite_loss_stops_naming_step_and_batch(tiny_model_dir, demo_file, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = make(tiny_model_dir, optimization={"learning_rate": 5e-3})
    poison_loss(module, at_batch=2, value=float("nan"))
    dm = data(tiny_model_dir, demo_file, train_records=(0, 20), batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(LitMistralError, match=r"the training loss is nan at step 2 \(epoch 0, batch 2 of the "
                                              r"epoch\)\. Checkpoints written so far hold finite weights\. Fix: lower "
                                              r"--model\.optimization\.learning_rate .* "
                                              r"--model\.optimization\.nonfinite skip"):
        trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[ckpt]).fit(module, dm)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class WeightsMoved(Callback):
    """Whether each batch changed the adapter weights: `changed[batch_idx]`."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = adapter_state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = adapter_state(pl_module)
        self.changed[batch_idx] = any(not torch.equal(after[k], v) for k, v in self.before.items())


def test_nonfinite_loss_skipped_when_asked(tiny_model_dir, demo_file, tmp_path):
    module = make(tiny_model_dir, optimization={"learning_rate": 5e-3, "nonfinite": "skip"})
    poison_loss(module, at_batch=2, value=float("inf"))
    moved = WeightsMoved()
    dm = data(tiny_model_dir, demo_file, train_records=(0, 20), batch_size=4)
    with pytest.warns(UserWarning, match=r"the training loss is inf at step 2 \(epoch 0, batch 2 of the epoch\): "
                                         r"batch skipped \(model.optimization.nonfinite=skip; 1 so far\)"):
        trainer(tmp_path, max_steps=5, callbacks=[moved]).fit(module, dm)
    # no update from the bad batch, then training goes on
    assert moved.changed == {0: True, 1: True, 2: False, 3: True, 4: True}
    assert module.losses.skipped_batches == 1
    assert all(torch.isfinite(v).all() for v in adapter_state(module).values())


@pytest.mark.slow
def test_packed_fast_path_learns_like_the_padded_path_on_the_real_model(smollm2_gguf, tmp_path):
    """SmolLM2-135M (real weights): the same 3 steps on the same batches, padded or packed into one row with
    per-example attention, end at the same validation loss (tolerance 1e-4, fp32 on CPU). The base is not quantized
    (what is compared is the batch layout); each run starts from the same adapter weights."""
    name, gguf = smollm2_gguf
    seed_everything(3)
    module = make(name, gguf_file=gguf, quantization={"method": None}, optimization={"learning_rate": 1e-3},
                  compute={"gradient_checkpointing": False}).build(torch.device("cpu"))
    start = adapter_state(module)
    results = {}
    for packing in (False, True):
        if module.model is None:  # the validate before released it: fit rebuilds it with these adapter weights
            module.kept_adapter = {n: v.clone() for n, v in start.items()}
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in start:
                    p.copy_(start[n])
        dm = InstructionDataModule(path="pkg://lit_mistral/assets/demo.jsonl", tokenizer=name, gguf_file=gguf,
                                   prompt_style="chat_template", max_length=256, batch_size=2, packing=packing,
                                   train_records=(0, 6), val_records=(56, 60))
        trainer(tmp_path / str(packing), max_steps=3, limit_val_batches=0).fit(module, dm)
        results[packing] = trainer(tmp_path / str(packing)).validate(module, dm, verbose=False)[0]["val/loss"]
    assert results[True] == pytest.approx(results[False], abs=1e-4)


def test_loss_at_collated_positions_equals_the_masked_loss(tiny_model_dir, demo_file):
    """The loss gathered at the positions the collate found (`labelled`) is the one a boolean mask of the labels
    selects (the path of batches without them, such as a batch's parts), padded and packed."""
    dm = data(tiny_model_dir, demo_file)
    dm.setup("fit")
    items = [dm.train_set[i] for i in range(5)]
    module = make(tiny_model_dir, compute={"dtype": "float32", "gradient_checkpointing": False}).build(
        torch.device("cpu"))
    for batch in (collate_padded(items, dm.tokenizer.pad_token_id), collate_packed(items)):
        plain = {k: v for k, v in batch.items() if k not in ("labelled", "num_labels")}
        with torch.no_grad():
            (gathered, n), (masked, m) = module.loss_sum(batch), module.loss_sum(plain)
        assert int(n) == int(m) == batch["num_labels"] > 0
        torch.testing.assert_close(gathered, masked, rtol=0, atol=0)


def test_batches_pinned_for_a_gpu(tiny_model_dir, demo_file):
    """Batches for a CUDA device are collated into pinned memory (their copies then queue behind the running step);
    for the CPU they are not."""
    from types import SimpleNamespace

    dm = data(tiny_model_dir, demo_file, train_records=(0, 20), val_records=(20, 24))
    dm.setup("fit")
    assert not dm.train_dataloader().pin_memory and not dm.val_dataloader().pin_memory and not dm._to_gpu()
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert dm._to_gpu()
    dm.trainer = None
    dm._to_gpu = lambda: True
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory


@pytest.mark.gpu
def test_liger_kernels_change_speed_not_the_loss(tiny_model_dir, demo_file):
    """Liger's RMSNorm/SwiGLU/RoPE on a GPU: the same loss (bf16 tolerance) as transformers' modules."""
    pytest.importorskip("liger_kernel")
    dm = data(tiny_model_dir, demo_file)
    dm.setup("fit")
    batch = collate_packed([dm.train_set[i] for i in range(6)])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    losses = {}
    for kernels in (None, "liger"):
        torch.manual_seed(0)
        module = make(tiny_model_dir, compute={"kernels": kernels, "dtype": "bfloat16"}).build(torch.device("cuda"))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = module.loss_sum(batch)
        losses[kernels] = float(loss / n)
    assert losses["liger"] == pytest.approx(losses[None], rel=1e-2)


@pytest.mark.gpu
def test_paged_optimizer_steps_on_a_gpu(tiny_model_dir):
    """bitsandbytes' paged AdamW on CUDA (on CPUs it falls back to the plain one): a step moves the adapters, and
    the state of a tensor large enough to page (bitsandbytes pages those of 100,000 numbers or more) lives in
    paged memory."""
    module = make(tiny_model_dir, compute={"dtype": "bfloat16"}).build(torch.device("cuda"))
    big = torch.nn.Parameter(torch.randn(512, 256, device="cuda"))
    params = [p for p in module.parameters() if p.requires_grad] + [big]
    config = optimizer_and_schedule(params, Optimization(learning_rate=1e-2), total_steps=4)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    config["optimizer"].step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    state = config["optimizer"].state[big]["state1"]  # a view of CUDA managed memory, paged by the driver
    assert getattr(state, "is_paged", False) and state.page_deviceid == 0


@pytest.mark.gpu
def test_torch_adamw_is_fused_on_a_gpu():
    """`adamw` on CUDA parameters is torch's fused AdamW (one kernel for all of them), and steps as the unfused one."""
    results = []
    for device in ("cuda", "cpu"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(16, 8).to(device)) for _ in range(3)]
        optimizer = optimizer_and_schedule(params, Optimization(optimizer="adamw", learning_rate=1e-2,
                                                                weight_decay=0.1), total_steps=4)["optimizer"]
        assert optimizer.defaults["fused"] is (True if device == "cuda" else None)
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.5 + step)
            optimizer.step()
        results.append([p.detach().cpu() for p in params])
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_a_paged_optimizer_on_the_cpu_is_the_same_optimizer_unpaged_without_a_warning():
    """Paging moves optimizer states between GPU and CPU memory; on the CPU bitsandbytes warned at the first step
    (into the progress bar) and ran unpaged. lit_mistral asks for the unpaged one there."""
    import warnings

    import bitsandbytes as bnb

    for paged, unpaged in (("paged_adamw_32bit", bnb.optim.AdamW32bit), ("paged_adamw_8bit", bnb.optim.AdamW8bit)):
        params = [torch.nn.Parameter(torch.randn(64, 64))]
        optimizer = optimizer_and_schedule(params, Optimization(optimizer=paged), 10)["optimizer"]
        assert type(optimizer) is unpaged
        params[0].grad = torch.ones_like(params[0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
        assert not [str(w.message) for w in caught if "aged" in str(w.message)]
