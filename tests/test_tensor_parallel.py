"""Tensor parallelism's arithmetic (engine/parallel.py): which heads and rows each rank holds, and
which prefill rank writes which KV heads into which decode rank. No processes."""
import json
from types import SimpleNamespace

import pytest
import torch

from pdserve_testing.harness import write_config

from pdserve.engine.kv_transport import KVDestination, KVPool, TransferError, contiguous_runs
from pdserve.engine.parallel import (check_divisible, copies_from, handoff_plan, rank_config, shard_of,
                                     shard_state_dict, slot_pieces, split)
from pdserve.repository.config import ConfigError, config_to_json, load_model_spec


def config(heads=8, kv_heads=4, hidden=64, intermediate=96, vocab=100, head_dim=None):
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=hidden,
                           intermediate_size=intermediate, vocab_size=vocab, head_dim=head_dim)


@pytest.mark.parametrize("total,size", [(8, 1), (8, 2), (8, 4), (100, 3), (1408, 4), (7, 4)])
def test_split_covers_every_row_once_in_rank_order(total, size):
    ranges = [split(total, size, r) for r in range(size)]
    assert [i for r in ranges for i in r] == list(range(total))
    assert max(len(r) for r in ranges) - min(len(r) for r in ranges) <= -(-total // size)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_each_rank_holds_consecutive_heads_and_the_kv_heads_its_query_heads_read(size):
    c = config(heads=8, kv_heads=4)      # GQA: two query heads per KV head
    shards = [shard_of(r, size, c) for r in range(size)]
    assert [h for s in shards for h in s.heads] == list(range(8))
    assert [h for s in shards for h in s.kv_heads] == list(range(4))
    for s in shards:
        assert len(s.heads) == 8 // size and len(s.kv_heads) == 4 // size
        # query head q reads KV head q // 2: every one of this rank's query heads finds its KV head here
        assert {q // 2 for q in s.heads} == set(s.kv_heads)
        assert s.head_dim == 64 // 8


def test_vocab_rows_are_padded_to_one_width_for_the_gather():
    shards = [shard_of(r, 4, config(vocab=10)) for r in range(4)]
    assert [(s.vocab_rows.start, s.vocab_rows.stop) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert {s.vocab_per_rank for s in shards} == {3}


@pytest.mark.parametrize("size,heads,kv_heads,word", [(3, 8, 4, "num_attention_heads"),
                                                       (4, 8, 2, "num_key_value_heads"),
                                                       (0, 8, 4, "at least 1")])
def test_sizes_the_heads_do_not_allow_are_refused_naming_the_field(size, heads, kv_heads, word):
    why = check_divisible(size, heads, kv_heads)
    assert word in why and ("tensor_parallel_size" in why)
    with pytest.raises(ValueError, match=word):
        shard_of(0, size, config(heads=heads, kv_heads=kv_heads))


def test_a_rank_config_describes_the_ranks_modules_and_keeps_the_head_dim():
    c = config(heads=8, kv_heads=4, hidden=64, intermediate=96, vocab=100)
    mine = rank_config(c, shard_of(1, 2, c))
    assert (mine.num_attention_heads, mine.num_key_value_heads, mine.head_dim) == (4, 2, 8)
    assert (mine.intermediate_size, mine.vocab_size, mine.hidden_size) == (48, 50, 64)
    assert c.num_attention_heads == 8     # the model's own config is untouched


def _checkpoint(c, layers=1):
    d = c.hidden_size // c.num_attention_heads
    state = {"model.embed_tokens.weight": torch.randn(c.vocab_size, c.hidden_size),
             "lm_head.weight": torch.randn(c.vocab_size, c.hidden_size), "model.norm.weight": torch.randn(c.hidden_size)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state |= {p + "self_attn.q_proj.weight": torch.randn(c.num_attention_heads * d, c.hidden_size),
                  p + "self_attn.q_proj.bias": torch.randn(c.num_attention_heads * d),
                  p + "self_attn.k_proj.weight": torch.randn(c.num_key_value_heads * d, c.hidden_size),
                  p + "self_attn.v_proj.weight": torch.randn(c.num_key_value_heads * d, c.hidden_size),
                  p + "self_attn.o_proj.weight": torch.randn(c.hidden_size, c.num_attention_heads * d),
                  p + "mlp.gate_proj.weight": torch.randn(c.intermediate_size, c.hidden_size),
                  p + "mlp.up_proj.weight": torch.randn(c.intermediate_size, c.hidden_size),
                  p + "mlp.down_proj.weight": torch.randn(c.hidden_size, c.intermediate_size),
                  p + "input_layernorm.weight": torch.randn(c.hidden_size)}
    return state


@pytest.mark.parametrize("size", [1, 2, 4])
def test_the_shards_of_a_checkpoint_compute_the_whole_layer(size):
    """Column-parallel pieces concatenate to the whole output; row-parallel pieces sum to it:
    the algebra the all-reduces and the vocabulary gather rely on."""
    c = config()
    state = _checkpoint(c)
    parts = [shard_state_dict(state, shard_of(r, size, c)) for r in range(size)]
    x = torch.randn(3, c.hidden_size)
    p = "model.layers.0."
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight"):
        whole = x @ state[p + name].T
        assert torch.allclose(torch.cat([x @ part[p + name].T for part in parts], dim=1), whole)
    assert torch.equal(torch.cat([part[p + "self_attn.q_proj.bias"] for part in parts]), state[p + "self_attn.q_proj.bias"])
    for name, inner in (("self_attn.o_proj.weight", c.num_attention_heads * 8), ("mlp.down_proj.weight", c.intermediate_size)):
        y = torch.randn(3, inner)
        pieces = [y[:, split(inner, size, r)] for r in range(size)]
        assert torch.allclose(sum(piece @ part[p + name].T for piece, part in zip(pieces, parts)),
                              y @ state[p + name].T, atol=1e-4)
    assert torch.equal(torch.cat([part["lm_head.weight"] for part in parts]), state["lm_head.weight"])
    assert all(part["model.norm.weight"] is state["model.norm.weight"] for part in parts)


def test_a_row_parallel_bias_is_refused():
    c = config()
    state = _checkpoint(c) | {"model.layers.0.mlp.down_proj.bias": torch.zeros(c.hidden_size)}
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        shard_state_dict(state, shard_of(0, 2, c))


@pytest.mark.parametrize("kv_heads,p,d", [(4, 1, 1), (4, 2, 1), (4, 1, 2), (4, 2, 4), (4, 4, 2), (8, 4, 2), (8, 2, 8)])
def test_a_handoff_writes_every_kv_head_once_from_the_rank_that_holds_it_to_the_rank_that_owns_it(kv_heads, p, d):
    plan = handoff_plan(kv_heads, p, d)
    assert sorted(h for c in plan for h in c.heads) == list(range(kv_heads))
    for c in plan:
        src, dst = split(kv_heads, p, c.src_rank), split(kv_heads, d, c.dst_rank)
        assert set(c.heads) <= set(src) and set(c.heads) <= set(dst)
        assert c.src_first == c.heads.start - src.start and c.dst_first == c.heads.start - dst.start
    assert sum(len(copies_from(plan, r)) for r in range(p)) == len(plan)


def test_the_handoff_of_a_wide_prefill_into_a_narrow_decode():
    plan = handoff_plan(4, 2, 1)     # two prefill ranks, each writing its two heads into the one decode rank
    assert [(c.src_rank, c.dst_rank, list(c.heads), c.src_first, c.dst_first) for c in plan] == [
        (0, 0, [0, 1], 0, 0), (1, 0, [2, 3], 0, 2)]
    plan = handoff_plan(4, 1, 2)     # one prefill rank writing half its heads into each decode rank
    assert [(c.src_rank, c.dst_rank, list(c.heads), c.src_first, c.dst_first) for c in plan] == [
        (0, 0, [0, 1], 0, 0), (0, 1, [2, 3], 2, 0)]


def test_a_handoff_size_that_does_not_divide_the_kv_heads_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        handoff_plan(4, 3, 1)


# ---- the bytes of a handoff between sizes: pools as torch tensors, pieces copied by hand ---------

LAYERS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 2, 6, 2, 3


def rank_pools(full: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Each rank's pool of a model whose whole pool is `full` ([layers, blocks, 2, block_size,
    kv_heads, head_dim], stored layer-major as model_runner.py does)."""
    return [full[..., split(full.shape[-2], size, r), :].contiguous() for r in range(size)]


def handed_off(full: torch.Tensor, p: int, d: int, src_blocks, dst_blocks) -> list[torch.Tensor]:
    """The decode ranks' pools after every prefill rank wrote its pieces (slot_pieces), bytes
    copied as a one-sided write would."""
    heads = full.shape[-2]
    src, dst = rank_pools(full, p), [torch.zeros_like(pool) for pool in rank_pools(full, d)]
    block_bytes = [pool[0, 0].numel() * pool.element_size() for pool in src], [pool[0, 0].numel() * 4 for pool in dst]
    for c in handoff_plan(heads, p, d):
        src_bytes, dst_bytes = src[c.src_rank].view(-1).view(torch.uint8), dst[c.dst_rank].view(-1).view(torch.uint8)
        for layer in range(LAYERS):
            for run in contiguous_runs(src_blocks, dst_blocks):
                sb, db = block_bytes[0][c.src_rank], block_bytes[1][c.dst_rank]
                for s, t, n in slot_pieces(c, run, heads // p, heads // d, sb, db, 2 * BLOCK_SIZE):
                    dst_bytes[layer * BLOCKS * db + t:][:n] = src_bytes[layer * BLOCKS * sb + s:][:n]
    return dst


@pytest.mark.parametrize("heads,p,d", [(2, 1, 1), (2, 2, 1), (2, 1, 2), (2, 2, 2), (4, 2, 4), (4, 4, 2), (8, 2, 4)])
def test_every_prefill_ranks_pieces_fill_each_decode_ranks_heads_of_the_destination_blocks(heads, p, d):
    full = torch.randn(LAYERS, BLOCKS, 2, BLOCK_SIZE, heads, HEAD_DIM)
    src_blocks, dst_blocks = [0, 1, 2, 4], [3, 4, 5, 0]     # runs of different lengths on both sides
    pools = handed_off(full, p, d, src_blocks, dst_blocks)
    for j, pool in enumerate(pools):
        assert torch.equal(pool[:, dst_blocks], full[:, src_blocks][..., split(heads, d, j), :])
        assert not pool[:, [1, 2]].any(), "a block outside the destination was written"


def test_a_handoff_between_equal_splits_is_one_piece_per_run_and_between_others_one_per_slot():
    same, wider = handoff_plan(4, 2, 2)[0], handoff_plan(4, 2, 1)[1]
    assert slot_pieces(same, (0, 5, 3), 2, 2, 96, 96, 8) == [(0, 480, 288)]
    pieces = slot_pieces(wider, (1, 0, 2), 2, 4, 96, 192, 8)   # heads 2-3: the back half of each 24-byte slot
    assert len(pieces) == 16 and pieces[0] == (96, 12, 12) and pieces[1] == (108, 36, 12)


# ---- the same through Mooncake: one transport per rank in this process ------------------------

@pytest.fixture(scope="module")
def mooncake_ranks():
    from pdserve.engine.kv_transport import MooncakeTransport
    made = [MooncakeTransport("127.0.0.1") for _ in range(4)]
    yield made


@pytest.mark.parametrize("p,d,blocks", [(2, 1, 4), (1, 2, 4), (2, 2, 4), (1, 2, 80)])
def test_mooncake_writes_each_prefill_ranks_heads_into_the_decode_ranks_that_own_them(mooncake_ranks, p, d, blocks):
    """Each rank registers its own pool; the destination lists the decode ranks' pools with their
    heads. 80 blocks: more slices than one batch may carry (MAX_SLICES_IN_FLIGHT)."""
    heads = 2
    full = torch.randn(LAYERS, blocks + 1, 2, BLOCK_SIZE * 8, heads, HEAD_DIM)
    src, dst = rank_pools(full, p), [torch.zeros_like(pool) for pool in rank_pools(full, d)]
    senders, receivers = mooncake_ranks[:p], mooncake_ranks[2:2 + d]
    for r, (transport, pool) in enumerate([*zip(senders, src), *zip(receivers, dst)]):
        transport.register_pool(pool.transpose(0, 1))
        size = p if r < p else d
        transport.hold_heads(split(heads, size, r % size), heads)
    handshakes = [t.handshake() for t in receivers]
    pools = tuple(KVPool(h["session"], h["base_address"], h["block_bytes"], h["layer_stride"],
                         (split(heads, d, j).start, split(heads, d, j).stop)) for j, h in enumerate(handshakes))
    src_blocks, dst_blocks = list(range(blocks)), list(range(1, blocks + 1))
    destination = KVDestination(**handshakes[0], block_ids=tuple(dst_blocks), pools=pools if d > 1 else ())
    for sender in senders:
        sender.check(destination)
        sender.wait([sender.submit_layer(destination, layer, src_blocks, dst_blocks)[0] for layer in range(LAYERS)])
    for j, pool in enumerate(dst):
        assert torch.equal(pool[:, dst_blocks], full[:, src_blocks][..., split(heads, d, j), :])
    for transport, pool in [*zip(senders, src), *zip(receivers, dst)]:
        transport.engine.unregister_memory(pool.data_ptr())


def test_a_destination_whose_pools_split_the_heads_otherwise_is_refused(mooncake_ranks):
    transport = mooncake_ranks[0]
    pool = torch.zeros(LAYERS, BLOCKS, 2, BLOCK_SIZE, 2, HEAD_DIM)
    transport.register_pool(pool.transpose(0, 1))
    h = transport.handshake()
    wrong = tuple(KVPool(h["session"], 0, h["block_bytes"] // 2, 0, heads) for heads in ((0, 1), (0, 1)))
    with pytest.raises(TransferError, match="same model"):
        transport.check(KVDestination(**h, block_ids=(1,), pools=wrong))
    other_dtype = tuple(KVPool(h["session"], 0, h["block_bytes"], 0, heads) for heads in ((0, 1), (1, 2)))
    with pytest.raises(TransferError, match="block size differs"):
        transport.check(KVDestination(**h, block_ids=(1,), pools=other_dtype))
    transport.engine.unregister_memory(pool.data_ptr())


def test_a_prefill_of_size_2_beside_a_decode_of_size_1_is_a_valid_config(tmp_path):
    groups = ('{ role: PREFILL devices: [ "cpu:0", "cpu:1" ] tensor_parallel_size: 2 }, '
              '{ role: DECODE devices: [ "cpu:0" ] }')
    spec = load_model_spec(tp_model(tmp_path, groups))
    assert [(i.role, i.ranks) for i in spec.instances] == [("PREFILL", ("cpu:0", "cpu:1")), ("DECODE", ("cpu:0",))]


# ---- config.pbtxt: instance_group { tensor_parallel_size } ------------------------------------

def tp_model(tmp_path, group: str, hf: dict | None = None) -> str:
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "config.json").write_text(json.dumps(hf or {"model_type": "qwen2", "num_attention_heads": 8,
                                                                "num_key_value_heads": 4}))
    write_config(str(folder), f"instance_group [ {group} ]\n")
    return str(folder)


def test_each_size_consecutive_devices_form_one_instance_and_count_multiplies(tmp_path):
    group = '{ devices: [ "npu:0", "npu:1", "npu:2", "npu:3" ] tensor_parallel_size: 2 count: 2 }'
    spec = load_model_spec(tp_model(tmp_path, group))
    assert [i.ranks for i in spec.instances] == [("npu:0", "npu:1"), ("npu:0", "npu:1"), ("npu:2", "npu:3"), ("npu:2", "npu:3")]
    assert [i.device for i in spec.instances] == ["npu:0", "npu:0", "npu:2", "npu:2"]
    assert len({i.name for i in spec.instances}) == 4
    assert config_to_json(spec.config)["instance_group"][0]["tensor_parallel_size"] == 2


def test_the_default_size_is_one_device_per_instance_and_shows_in_the_config(tmp_path):
    spec = load_model_spec(tp_model(tmp_path, '{ devices: [ "cpu:0", "cpu:1" ] }'))
    assert [(i.device, i.ranks) for i in spec.instances] == [("cpu:0", ("cpu:0",)), ("cpu:1", ("cpu:1",))]
    assert spec.config.instance_group[0].tensor_parallel_size == 1


@pytest.mark.parametrize("group,hf,words", [
    ('{ devices: [ "cpu:0", "cpu:1", "cpu:0" ] tensor_parallel_size: 2 }', None,
     ["instance_group[0].tensor_parallel_size is 2", "devices lists 3", "multiple of 2"]),
    ('{ devices: [ "cpu:0", "cuda:0" ] tensor_parallel_size: 2 }', None, ["mixes cpu and cuda", "one kind"]),
    ('{ devices: [ "cpu:0" ] tensor_parallel_size: -1 }', None, ["tensor_parallel_size is -1"]),
    ('{ devices: [ "cpu:0", "cpu:1", "cpu:2" ] tensor_parallel_size: 3 }', None,
     ["tensor_parallel_size is 3", "num_attention_heads 8 is not divisible", "divides"]),
    ('{ devices: [ "cpu:0", "cpu:1" ] tensor_parallel_size: 2 }',
     {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 1},
     ["num_key_value_heads 1 is not divisible by tensor_parallel_size 2"]),
    ('{ devices: [ "cpu:0", "cpu:1" ] tensor_parallel_size: 2 }',
     {"model_type": "mixtral", "num_attention_heads": 8, "num_key_value_heads": 8},
     ["model_type 'mixtral'", "use tensor_parallel_size 1"]),
])
def test_sizes_that_cannot_work_are_config_errors_naming_the_field_and_the_fix(tmp_path, group, hf, words):
    with pytest.raises(ConfigError) as info:
        load_model_spec(tp_model(tmp_path, group, hf))
    assert "config.pbtxt" in str(info.value)
    for word in words:
        assert word in str(info.value)


# ---- the sharded model: two ranks as two threads of this process ------------------------------

class ThreadGroup:
    """RankGroup's collectives between threads (engine/ranks.py has the torch.distributed ones):
    enough to run each rank's shard of a model side by side without processes."""

    def __init__(self, rank: int, size: int, shared: dict):
        self.rank, self.size, self.shared = rank, size, shared

    def _exchange(self, value):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = value
        barrier.wait()
        everyone = list(slots)
        barrier.wait()
        return everyone

    def all_reduce(self, x):
        x.copy_(sum(self._exchange(x.clone())))
        return x

    def gather_columns(self, x, width, total):
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        return torch.cat(self._exchange(x), dim=-1)[..., :total]

    def agree_min(self, value, device):
        return min(self._exchange(value))


def test_the_ranks_shards_compute_one_devices_logits(small_model):
    import threading

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.engine.sequence import SamplingParams, Sequence

    cfg = EngineConfig(model_path=small_model, dtype="float32", kv_cache_blocks=8, max_model_len=128)
    prompt = list(range(3, 40))

    def logits(runner) -> torch.Tensor:
        seq = Sequence("r", prompt, SamplingParams(), block_table=[1, 2, 3])
        input_ids, positions, meta, _, _ = runner._prepare([(seq, len(prompt))], [])
        with torch.inference_mode():
            return runner.model(input_ids, positions, runner.kv_cache, meta)

    whole = logits(ModelRunner(cfg))
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=60)}
    results: dict = {}

    def rank(r: int) -> None:
        runner = ModelRunner(cfg, ThreadGroup(r, 2, shared))
        results[r] = (runner.kv_cache.shape, logits(runner))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0][0][-2] == 1      # the small model's 2 KV heads: one in each rank's pool
    assert torch.equal(results[0][1], results[1][1])
    assert torch.allclose(results[0][1], whole, atol=1e-4)
    assert torch.equal(results[0][1].argmax(-1), whole.argmax(-1))


def test_a_weight_that_is_not_a_tensor_is_refused_naming_the_fix():
    c = config()
    state = _checkpoint(c) | {"model.layers.0.mlp.up_proj.weight": object()}
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        shard_state_dict(state, shard_of(0, 2, c))
