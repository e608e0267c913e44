"""Folding a LoRA adapter into its base: a plain Hugging Face model that computes what the (4-bit) base + adapter
computes, for fast generation (`predict`) and for serving (`export`).

Written by hand because neither library does this for a 4-bit base: peft's `merge_and_unload` re-quantizes the
merged weight back to 4 bits (and so does not give the model that was trained), and transformers' `dequantize`
does not see through peft's wrappers. Here each adapted layer becomes an `nn.Linear` holding
dequantize(W_4bit) + scale * B @ A, summed in float32."""

import torch


def _dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float()


def _replace(model: torch.nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None,
             dtype: torch.dtype) -> None:
    """Put an `nn.Linear` holding `weight` (out, in) and `bias` where the module `name` was."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, linear)


def merge_adapter(peft_model, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every LoRA-adapted layer of `peft_model` by a plain `nn.Linear` with the merged weight, dequantize
    the rest, and return the underlying transformers model (no peft, no bitsandbytes left in it)."""
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    replaced = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # inside a layer merged already (its base_layer, lora_A, ...)
        if isinstance(module, LoraLayer):
            replaced.append(name)
            base = module.get_base_layer()
            weight = _dequantized_weight(base)  # (out, in)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight += module.get_delta_weight(adapter).float()  # scale * B @ A, (out, in)
            _replace(model, name, weight, base.bias, dtype)
        elif type(module).__name__ == "Linear4bit":  # 4-bit layers without an adapter
            _replace(model, name, _dequantized_weight(module), module.bias, dtype)
    # the model is an ordinary one now: drop what marks it quantized (transformers refuses to cast those, and
    # save_pretrained would describe a quantized model)
    model.hf_quantizer = None
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        model.__dict__.pop(attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(dtype)
    model.config.dtype = dtype
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and head is not None and head.weight is not embeddings.weight:
        model.config.tie_word_embeddings = False  # an adapted lm_head is no longer the embedding matrix
    return model
