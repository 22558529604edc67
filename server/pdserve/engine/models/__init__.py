"""Causal LMs of the Llama family written in plain torch over the paged KV cache."""
