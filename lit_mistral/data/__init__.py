"""Training data: reading and checking records, prompt and chat formats, tokenization with loss masking."""
