"""In-process engine helpers for tests and benchmarks that drive LLMEngine directly."""
from __future__ import annotations

from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sequence import SamplingParams


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Exactly n greedy tokens (EOS ignored) for each prompt, all admitted together and stepped to the end."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outputs = {str(i): [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id] += list(out.token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]
