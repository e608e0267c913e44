"""A randomly initialized 4-bit base built one decoder layer at a time (`--model.random_init true` with a quantized
base): each layer is made in the compute dtype on the target device, its linear layers are quantized there, and the
full-precision copy is freed before the next layer is made. Peak memory is the 4-bit model plus one layer in 16
bits, and nothing is written to disk, so the architecture of a base far larger than the GPU in 16 bits (Llama-2-70B:
140 GB in bf16, ~37 GB in NF4) can be benchmarked and dry-run on one GPU.

Written by hand because transformers quantizes only while loading saved weights (`from_pretrained` with a
`BitsAndBytesConfig`): a random model would first have to be written whole to disk. The model built here has what
that load gives: `bitsandbytes.nn.Linear4bit` layers (NF4/FP4, double quantization and storage dtype as asked) in
every decoder layer, embeddings, norms and the output layer in the compute dtype, `is_loaded_in_4bit` and the
config's `quantization_config`, so peft, the merge, the checkpoints and `fsdp_qlora` treat it as they treat a loaded
one. Weights follow transformers' initialization of these families: linear and embedding weights normal with the
config's `initializer_range`, biases zero, norms one."""

import contextlib
import copy
import sys

import torch


def _decoder_layer_class(model) -> type:
    """The decoder layer class of `model`'s family (its `_no_split_modules`, from the modeling module)."""
    names = [n for n in (getattr(model, "_no_split_modules", None) or []) if n.endswith("DecoderLayer")]
    module = sys.modules[type(model).__module__]
    found = [getattr(module, n) for n in names if hasattr(module, n)]
    if not found:
        raise ValueError(f"{type(model).__name__}: no decoder layer class found (_no_split_modules={names})")
    return found[0]


def _quantized(linear: torch.nn.Linear, compute_dtype, quant_type: str, double_quant: bool, storage, device):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=storage, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type, quant_storage=storage, module=layer).to(device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def random_quantized_model(config, device: torch.device, *, dtype: torch.dtype, quantization_config,
                           attn_implementation: str | None = None, trust_remote_code: bool = False, seed: int = 0):
    """A causal LM of `config`'s architecture with random weights, its decoder layers' linear layers quantized as
    `quantization_config` (a transformers `BitsAndBytesConfig`, 4-bit) says, built layer by layer on `device`
    (keywords as `from_pretrained` takes them)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    layers, layer_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    config = copy.deepcopy(config)
    config.num_hidden_layers = 0  # the shell: embeddings, final norm, output layer, rotary embedding
    if layer_types is not None:
        config.layer_types = []
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    config.num_hidden_layers = layers  # the model's modules share this config object
    if layer_types is not None:
        config.layer_types = layer_types
    std = config.initializer_range
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            module.weight.normal_(0, std)
    decoder_layer = _decoder_layer_class(model)
    q = quantization_config
    for i in range(layers):
        with torch.device(device), _default_dtype(dtype):  # made in 16 bits directly, not in float32 then cast
            layer = decoder_layer(config, i)
        for name, child in list(layer.named_modules()):
            if isinstance(child, torch.nn.Linear):
                child.weight.normal_(0, std)
                if child.bias is not None:
                    child.bias.zero_()
                parent, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, attr,
                        _quantized(child, dtype, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant,
                                   q.bnb_4bit_quant_storage, device))
        model.model.layers.append(layer)  # the 16-bit weights of this layer are garbage now
    from transformers.quantizers import AutoHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    # what `from_pretrained` with this config marks a model with (peft reads is_loaded_in_4bit; the merge clears all)
    model.config.quantization_config = q
    model.hf_quantizer = AutoHfQuantizer.from_config(q, pre_quantized=False)
    model.is_quantized, model.is_loaded_in_4bit = True, True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    return model.eval()
