"""What predict does around its batches: the predictor made on the chosen weights once the checkpoint is restored,
and at the end the model freed with the adapter weights kept on the CPU, so that the module used again (validate
after predict, predict twice in one process) rebuilds the model it had."""

import torch
from conftest import adapted

from lit_mistral.generation import lifecycle
from lit_mistral.generation.predictor import Predictor
from lit_mistral.modeling.adapters import trainable_state

IDS = torch.tensor([[1, 40, 41, 42, 43]])


def logits(module) -> torch.Tensor:
    with torch.no_grad():
        return module.model(input_ids=IDS).logits


def test_start_predict_makes_a_predictor_on_the_weights_asked_for_and_keeps_the_adapter(tiny_model_dir):
    module = adapted(tiny_model_dir, generation={"weights": "merged", "max_new_tokens": 4})
    expected, adapter = logits(module), {k: v.clone() for k, v in trainable_state(module).items()}
    lifecycle.start_predict(module)
    assert isinstance(module.predictor, Predictor) and module.model.config.use_cache
    assert not any("lora_" in name for name, _ in module.model.named_parameters())  # folded in
    torch.testing.assert_close(logits(module), expected, atol=2e-4, rtol=0)
    assert module.kept_adapter.keys() == adapter.keys()  # the unfolded weights, for the next build
    for name, weight in adapter.items():
        assert module.kept_adapter[name].device.type == "cpu"
        torch.testing.assert_close(module.kept_adapter[name], weight)


def test_release_frees_the_model_and_the_next_build_has_the_same_adapter(tiny_model_dir):
    module = adapted(tiny_model_dir, generation={"weights": "adapter", "max_new_tokens": 4})
    expected = logits(module)
    lifecycle.start_predict(module)
    lifecycle.release(module)
    assert module.model is None and module.predictor is None and module.kept_adapter is not None
    module.build(torch.device("cpu"), training=False)
    assert module.kept_adapter is None  # handed to the model
    torch.testing.assert_close(logits(module.eval()), expected, atol=2e-4, rtol=0)


def test_a_random_base_is_kept_because_it_cannot_be_built_the_same_again(tiny_model_dir):
    module = adapted(tiny_model_dir)
    module.spec.random_init = True
    model = module.model
    lifecycle.release(module)
    assert module.model is model
