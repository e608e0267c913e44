"""What predict does around its batches, for the LightningModule: the adapter folded in (or not) once the checkpoint
is restored, the `Predictor` made, each batch answered, and at the end the model freed with the adapter weights kept
on the CPU, so that a module used again rebuilds the same model."""

import torch

from lit_mistral.generation.answering import for_inference
from lit_mistral.generation.predictor import Predictor
from lit_mistral.modeling.adapters import trainable_state


def keep_adapter(module) -> None:
    """Copy `module`'s adapter weights to the CPU (`module.kept_adapter`), unless a copy is kept already."""
    if module.kept_adapter is None:
        module.kept_adapter = {k: v.to("cpu", copy=True) for k, v in trainable_state(module).items()}


def release(module) -> None:
    """Free the model of `module` at the end of predict and of a stand-alone validate, keeping the adapter weights
    on the CPU: Lightning's teardown would next copy the whole model to the CPU, and a module used again rebuilds it
    (`configure_model`, about as long as one load) with those weights. A randomly initialized base cannot be
    rebuilt the same, so it stays. (At the end of fit the model stays: the evaluation against the base runs on it
    next.)"""
    module.predictor = None  # the engine's KV cache and CUDA graphs
    if module.model is None or module.spec.random_init:
        return
    keep_adapter(module)
    module.model = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def start_predict(module) -> None:
    """After a checkpoint was restored, so the adapter weights are final: fold them in if asked (the unfolded weights
    are kept for a later run: `release`) and make the predictor."""
    torch.manual_seed(module.generation.seed)
    if not module.spec.random_init:
        keep_adapter(module)
    module.model = for_inference(module.model, module.generation.weights, module.device,
                                 module.spec.compute.torch_dtype(module.device))
    module.model.config.use_cache = True
    module.predictor = Predictor(module.model, module.tokenizer, module.generation)


def predict_batch(module, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
    """The answers that finished (`generation.predictor`): with the continuous engine, of this batch and earlier
    ones; the last batch drains them all."""
    trainer = module.trainer
    # after a SIGTERM this batch is the last: the engine finishes the rows it holds, so they are written before
    # predict stops (checkpointing.StopOnSigterm, at the next batch)
    last = batch_idx == trainer.num_predict_batches[dataloader_idx] - 1 or trainer.received_sigterm
    return module.predictor(batch, last)
