"""A request's sequences (OpenAI's choices): n returned out of best_of generated, each an engine
request of its own (protocol.sibling_params), run side by side through the shared core; the
prompt's full KV blocks are shared through the engines' prefix cache. Both doors use these."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from pdserve.frontend.core import Piece
from pdserve.frontend.logprobs import Scored, cumulative_logprob, prompt_scored, scored
from pdserve.frontend.tensors import GenerationRequest


@dataclass
class Choice:
    """One sequence's pieces as they came, less what the client is not shown."""
    text: str = ""
    tokens: list[Scored] = field(default_factory=list)   # generated, with log-probabilities when asked
    prompt: list[Scored] = field(default_factory=list)   # the prompt's, when asked
    finish_reason: str = ""
    n_out: int = 0
    offset: int = 0      # completions' text_offset of the next token
    started: bool = False
    calls: object = None  # streaming chat read for tool calls: its tool_calls.CallStream

    def add(self, piece: Piece, score_only: bool = False) -> tuple[str, list[Scored], list[Scored]]:
        """Takes in a piece; returns its shown text, tokens and prompt tokens. Scoring a prompt
        (max_tokens 0) shows none of the one token the engine generated."""
        prompt = prompt_scored(piece.prompt_token_ids, piece.prompt_logprobs) if piece.prompt_logprobs else []
        text, tokens = ("", []) if score_only else (piece.text, scored(piece.logprobs))
        self.text += text
        self.tokens += tokens
        self.prompt += prompt
        self.finish_reason = "length" if score_only and piece.finish_reason else piece.finish_reason
        self.n_out = 0 if score_only else piece.num_output_tokens
        return text, tokens, prompt


async def gather(req, gens: list[GenerationRequest], score_only: bool = False,
                 deadline: float | None = None) -> list[Choice]:
    """Every sequence of the request, run side by side; one failing cancels the others."""
    async def collect(gen: GenerationRequest) -> Choice:
        choice = Choice()
        async with contextlib.aclosing(req.generate(gen, deadline)) as pieces:
            async for piece in pieces:
                choice.add(piece, score_only)
        return choice
    if len(gens) == 1:
        return [await collect(gens[0])]
    tasks = [asyncio.ensure_future(collect(gen)) for gen in gens]
    try:
        return list(await asyncio.gather(*tasks))   # the first failure, as it came
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def merged(req, gens: list[GenerationRequest]):
    """The pieces of every sequence of a streaming request as (index, piece), in arrival order;
    a failure of one is raised to the reader, and leaving ends the engine calls still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, gen: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(req.generate(gen)) as pieces:
                async for piece in pieces:
                    queue.put_nowait((index, piece))
            queue.put_nowait((index, None))
        except Exception as exc:   # handed to the reader, which ends the request with it
            queue.put_nowait((index, exc))

    async def read():
        open_calls = len(gens)
        while open_calls:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                open_calls -= 1
                continue
            yield index, item

    tasks = [asyncio.ensure_future(pump(i, gen)) for i, gen in enumerate(gens)]
    reader = read()
    try:
        yield reader
    finally:
        await reader.aclose()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def best(choices: list[Choice], n: int) -> list[Choice]:
    """The n sequences with the highest log-probability (all of them when n were generated)."""
    return sorted(choices, key=lambda c: -cumulative_logprob(c.tokens))[:n] if len(choices) > n else choices
