"""Inference: text generation with a KV cache (:mod:`.generate`) and its tokenizers (:mod:`.tokenizer`)."""
