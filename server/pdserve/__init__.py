"""pdserve: a Triton-style model-repository server for LLMs with prefill/decode disaggregation."""

__version__ = "0.1.0"
