"""Constrained decoding's cost: the engine round of the reference workload (32 x 256 prompt x 128
greedy tokens, in this process) with a JSON schema on every request, against the same round
without one; and with the token masks filled beside the forward pass (a helper thread) against
filled right before sampling.

    python bench/structured_throughput.py [--model DIR] [--dtype float32] [--rounds 3]

Rounds alternate between the variants; tokens/s counts the tokens each round generated. The
schema's strings are unbounded, so random weights run every request to max_tokens, as without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

from pdserve_testing.harness import ROOT
from rounds import EngineRounds, make_prompts

NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN = 32, 256, 128   # the reference workload
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "notes": {"type": "array",
                                                                                  "items": {"type": "string"}}},
          "required": ["title", "notes"], "additionalProperties": False}


def run(rounds: EngineRounds, batch: list[list[int]], params) -> float:
    """Output tokens per second of one round with these sampling parameters."""
    engine = rounds.engine
    for i, token_ids in enumerate(batch):
        engine.add_request(f"r{i}", token_ids, params)
    count, start = 0, time.perf_counter()
    while engine.has_work():
        count += sum(len(out.token_ids) for out in engine.step())
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rounds = EngineRounds(args.model, args.dtype, "cpu", OUTPUT_LEN)
    batch = make_prompts(rounds.engine.tokenizer, NUM_REQUESTS, PROMPT_LEN)
    plain = rounds.params
    schema = dataclasses.replace(plain, structured_kind="json", structured_spec=json.dumps(SCHEMA))
    structured = rounds.engine.structured
    structured.check(schema)   # compiled once, before the rounds (as at admission)
    helper = structured._helper
    figures: dict[str, list[float]] = {"plain": [], "schema, masks beside the forward": [],
                                       "schema, masks before sampling": []}
    for _ in range(args.rounds):
        figures["plain"].append(run(rounds, batch, plain))
        structured._helper = helper
        figures["schema, masks beside the forward"].append(run(rounds, batch, schema))
        structured._helper = None
        figures["schema, masks before sampling"].append(run(rounds, batch, schema))
    base = statistics.median(figures["plain"])
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name:34s} {median:8.1f} tokens/s  ({median / base:.2f}x)  rounds: "
              + ", ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
