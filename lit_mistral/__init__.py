"""lit_mistral: QLoRA instruction fine-tuning of Mistral-7B (and any Hugging Face causal LM) with Lightning."""

__version__ = "0.1.0"
