"""Generating answers: prompts in static batches through transformers' `generate`, or a continuous-batching engine
over a paged KV cache."""
