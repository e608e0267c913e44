"""The names lit_mistral adds to its libraries, registered in one place."""

from lit_mistral.modeling.registry import register


def test_register_adds_the_attention_and_the_strategy_once():
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import StrategyRegistry
    from transformers import AttentionInterface

    from lit_mistral.modeling.attention import NAME, varlen_attention
    from lit_mistral.modeling.fsdp import NAME as STRATEGY
    from lit_mistral.modeling.fsdp import QLoRAFSDPStrategy

    register()
    register()  # idempotent
    assert AttentionInterface()[NAME] is varlen_attention
    assert StrategyRegistry[STRATEGY]["strategy"] is QLoRAFSDPStrategy
    trainer = Trainer(accelerator="cpu", devices=1, strategy=STRATEGY, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, QLoRAFSDPStrategy)
