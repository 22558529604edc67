"""The settings of one engine instance, from config.pbtxt parameters and the instance group."""
from __future__ import annotations

from dataclasses import asdict, dataclass

# auto: bfloat16 where the hardware computes it natively, float32 otherwise (model_runner.resolve_dtype)
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
# Linear weights quantized at load (engine/quantization.py): int8 on any device, fp8 on sm89+ GPUs;
# "" or none: as the checkpoint is (a compressed-tensors checkpoint runs its own scheme).
QUANTIZATIONS = ("", "none", "int8", "fp8")


@dataclass
class EngineConfig:
    model_path: str
    device: str = "cpu"
    dtype: str = "auto"
    quantization: str = ""
    max_model_len: int = 0            # 0: the model's max_position_embeddings
    kv_block_size: int = 16
    kv_cache_blocks: int = 0          # 0: sized from kv_cache_memory_fraction
    kv_cache_memory_fraction: float = 0.0  # 0: 0.9 of free memory on cuda/npu, 0.1 on cpu
    max_num_seqs: int = 64
    # The token budget of one step. With chunked prefill, a step mixes the running decodes with
    # up to this many prompt tokens (longer prompts go in pieces); without it, only whole prompts.
    max_num_batched_tokens: int = 256
    enable_chunked_prefill: bool = True
    # Full KV blocks stay cached by content after their request ends (LRU), and a new prompt
    # reuses its longest cached block prefix.
    enable_prefix_caching: bool = True
    # GiB of host memory for KV blocks the pool evicts, reused from there by later prompts
    # (engine/kv_offload.py); 0: none. cpu engines only for now.
    kv_offload_host_gb: float = 0.0
    # A disk tier below it (or below the pool): GiB of block files in a private folder under
    # kv_offload_disk_path (engine/kv_disk.py); 0: none.
    kv_offload_disk_path: str = ""
    kv_offload_disk_gb: float = 0.0
    # The cluster's KV store below the tiers (engine/kv_store.py): "mooncake" puts every computed
    # block in Mooncake Store, where every engine of the cluster finds it; kv_store_gb of this
    # engine's memory is lent to the store. kv_store_endpoint: the master (host:port); empty:
    # the cluster's (pdserve's --kv-store-endpoint, or the master pdserve started).
    kv_store: str = ""
    kv_store_gb: float = 1.0
    kv_store_endpoint: str = ""
    seed: int = 0
    max_queue_len: int = 1024         # waiting requests past which new ones get RESOURCE_EXHAUSTED
    # An idle engine that gets a request keeps taking the requests that follow within this long
    # of each other, until its first step is full (or 10 windows passed), so a burst's prompts
    # share that step instead of queuing behind a step of one or two (engine/worker.py). A lone
    # request waits one window. 0: start at once.
    admission_window_ms: float = 10.0
    # GPU engines replay a CUDA graph per decode batch size (engine/decode_graphs.py); true: every
    # step runs eagerly (vLLM's flag of the same name)
    enforce_eager: bool = False

    def to_dict(self) -> dict:
        return asdict(self)
