"""The engine: one worker process per model instance, on its device.

sequence -> block_manager -> scheduler -> model_runner (models/) -> sampler, tied together
by llm_engine and served over the engine RPC by worker.
"""
