"""The names lit_mistral adds to its libraries, in one place:

- transformers' attention implementation `lit_varlen` (`lit_mistral.modeling.attention`), with SDPA's mask builder;
- Lightning's strategy `fsdp_qlora` (`lit_mistral.modeling.fsdp.QLoRAFSDPStrategy`).

`register()` is idempotent; the CLI calls it before parsing (so `--trainer.strategy fsdp_qlora` resolves), and
`build_model` before loading (so `attn_implementation: lit_varlen` does). Python users who build a Trainer with
`strategy="fsdp_qlora"` themselves call it first."""


def register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from lit_mistral.modeling import attention, fsdp

    AttentionInterface.register(attention.NAME, attention.varlen_attention)
    AttentionMaskInterface.register(attention.NAME, sdpa_mask)
    if fsdp.NAME not in StrategyRegistry:
        StrategyRegistry.register(fsdp.NAME, fsdp.QLoRAFSDPStrategy,
                                  description="FSDP for 4-bit QLoRA models (lit_mistral)")
