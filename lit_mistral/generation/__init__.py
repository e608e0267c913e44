"""Generation without transformers' `generate`: a continuous-batching engine over a paged KV cache."""
