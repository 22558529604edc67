"""pdserve's client side, written over tritonclient.grpc as users of Triton would write it."""
from pdserve_clients.client import GenerationResult, LLMClient

__all__ = ["GenerationResult", "LLMClient"]
