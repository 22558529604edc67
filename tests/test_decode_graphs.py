"""CUDA graphs of the decode forward (engine/decode_graphs.py), their logic checked on the CPU.

A real graph replays the kernels it captured, reading the buffers it captured; the stand-in
below re-runs the captured forward over those same buffers on replay, so what is checked here is
pdserve's side: the batch sizes, the fixed buffers a step fills, the padding rows kept to their
scratch block, the logits sliced back. tests/test_cuda.py replays real graphs on a GPU. Also the
page table FlashInfer's paged decode is planned with (kernels/flashinfer_decode.py).
"""
import random

import pytest
import torch
from pdserve_testing.harness import config_text
from test_units import model_folder

from pdserve.engine.config import EngineConfig
from pdserve.engine.decode_graphs import graph_batch_sizes
from pdserve.engine.kernels.flashinfer_decode import page_lists
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.sequence import SamplingParams, Sequence
from pdserve.repository.config import ConfigError, load_model_spec


class Rerun:
    """A graph stand-in: capture runs the forward once, replay runs it again into the same output."""

    def __init__(self, pool=None):
        self.forward, self.out = None, None

    def capture(self, forward):
        self.forward, self.out = forward, forward()
        return self.out

    def replay(self):
        out = self.forward()
        assert out.shape == self.out.shape   # the forward reads the buffers of the size it captured
        self.out.copy_(out)

    def memory_pool(self):
        return None


def test_graph_batch_sizes_follow_vllms_ladder_up_to_max_num_seqs():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(12) == [1, 2, 4, 8, 12]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(1) == [1]


def test_page_lists_name_each_sequences_pages_and_its_last_pages_fill():
    indptr, indices, last = page_lists([[7, 3, 9], [4], [5, 6]], [33, 16, 17], block_size=16)
    assert indptr == [0, 3, 4, 6] and indices == [7, 3, 9, 4, 5, 6] and last == [1, 16, 1]
    # a table longer than the context (blocks reserved ahead) gives only the pages in use
    assert page_lists([[1, 2, 3]], [10], 16) == ([0, 1], [1], [10])
    with pytest.raises(ValueError, match="needs 2 blocks"):
        page_lists([[1]], [17], 16)


@pytest.fixture
def runner(small_model):
    return ModelRunner(EngineConfig(model_path=small_model, dtype="float32", kv_cache_blocks=64, max_model_len=256,
                                    max_num_seqs=12))


def prefilled(runner, count: int, seed: int) -> list[Sequence]:
    """count sequences of various lengths, prefilled, each with one sampled token to decode from;
    blocks 1..62 (0 took the warm-up, 63 is the graphs' scratch)."""
    rng = random.Random(seed)
    free = iter(range(1, 63))
    seqs = []
    for i in range(count):
        n = rng.randrange(3, 60)
        seq = Sequence(f"s{seed}-{i}", [rng.randrange(3, runner.vocab_size) for _ in range(n)],
                       SamplingParams(temperature=0.0))
        seq.block_table = [next(free) for _ in range((n + 8 + runner.block_size - 1) // runner.block_size)]
        seqs.append(seq)
    for seq, token in runner.run(SchedulerOutput(prefills=[(s, s.num_tokens) for s in seqs])):
        seq.num_cached_tokens = seq.num_tokens
        seq.output_token_ids.append(token)
    return seqs


def test_a_replayed_decode_gives_the_eager_logits_and_pads_touch_only_the_scratch_block(runner):
    graphs = runner.make_decode_graphs(Rerun)
    graphs.capture()
    graphs.check()
    assert graphs.sizes == [1, 2, 4, 8, 12] and graphs.scratch_block == 63
    pool = runner.kv_cache
    for count, seed in ((5, 1), (3, 2), (1, 3), (12, 4)):   # padded to 8, 4, 1, 12 (stale table rows between)
        seqs = prefilled(runner, count, seed)
        _, _, eager = runner._forward([], seqs, head=runner.model.logits)
        before = pool.clone()
        pool[63] = float("nan")   # what pads attend over besides their own slot: must stay masked
        replayed = graphs.run(seqs)
        assert replayed.shape == eager.shape
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
        # the step's own KV slots are rewritten with the same values; no other block is touched
        torch.testing.assert_close(pool[:63], before[:63], rtol=1e-5, atol=1e-5, equal_nan=True)
        if graphs.size_for(count) > count:
            assert torch.isfinite(pool[63, :, :, 0]).all()   # the pads wrote their slot of the scratch block
    assert graphs.run(seqs + seqs[:1]) is None   # 13, past the largest graph: the caller runs it eagerly


def test_a_runner_with_graphs_samples_the_eager_tokens(runner):
    seqs = prefilled(runner, 6, 7)
    eager = [(s.request_id, t) for s, t in runner.run(SchedulerOutput(decodes=seqs))]
    runner.decode_graphs = runner.make_decode_graphs(Rerun)
    runner.decode_graphs.capture()
    replayed = [(s.request_id, t) for s, t in runner.run(SchedulerOutput(decodes=seqs))]
    assert replayed == eager


def test_enforce_eager_is_a_config_parameter(tmp_path):
    spec = load_model_spec(model_folder(tmp_path / "a", config_text(enforce_eager="true")))
    assert spec.engine_config(1, "cuda:0").enforce_eager is True
    assert load_model_spec(model_folder(tmp_path / "b", config_text())).engine_config(1, "cuda:0").enforce_eager is False
    with pytest.raises(ConfigError, match="'enforce_eager' is 'maybe'; it must be a bool"):
        load_model_spec(model_folder(tmp_path / "c", config_text(enforce_eager="maybe")))


class Frozen(Rerun):
    """A capture that went wrong: replays leave the output as captured."""

    def replay(self):
        pass


def test_a_graph_that_replays_wrong_is_found_at_load(runner):
    graphs = runner.make_decode_graphs(Frozen)
    graphs.capture()
    with torch.inference_mode():   # what the capture left, other than what the rows compute
        for size in graphs.sizes:
            graphs.outputs[size].add_(1.0)
    with pytest.raises(RuntimeError, match="differs from the eager forward"):
        graphs.check()
