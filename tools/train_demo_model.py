"""Trains the demo model on the Python standard library, in minutes on two CPU cores.

Three minutes of CPU buy about a million training tokens, far too few for the demo shape (8 layers,
hidden 512) trained as it is: so few that a narrower model, taking more steps in the same time,
ends better. So a model with the same layers and head size but a fraction of the width, heads
and MLP neurons (the Makefile trains a quarter) is trained, then widened into the demo shape
without changing what it computes and with every weight used (`widen`). Training starts
from a bigram model fitted to the corpus's counts (`fit_bigram`): the first thing a language
model learns, computed here from all the corpus at once instead of learnt from a few batches.

The served model is prompted and scored with up to its whole context, and a model trained on
short windows only gets worse the more context it is given: attention it never learnt to spread
over distant tokens. So the steps follow a length curriculum (`CURRICULUM`): short windows first,
for varied batches while the model learns the language; then long windows, fewer to a batch so a
step costs about the same, for it to learn to use long context. Small batches and twice the steps
beat the same tokens in fewer, larger batches: at this size updates are scarcer than tokens
(halving the batches again did not help). Starting windows at file beginnings, as scored text
starts (less varied batches), and leaving out pydoc_data's prose did not help either.

The held-out files are never trained on: tests/test_generation_features.py scores two of them
through the server. Nothing is downloaded; the seed fixes the data order and the weights.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import random
import sysconfig
import time

import torch

# Held out of training, so that scoring them measures the model, not its memory. They exist in
# every Python 3 the project supports.
HELD_OUT = ("queue.py", "shlex.py", "json/decoder.py", "zipapp.py", "tabnanny.py", "string.py", "sched.py",
            "textwrap.py")
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


@dataclasses.dataclass(frozen=True)
class Phase:
    """Windows of `length` tokens, `batch` to a step, from `start` (a share of the steps) on."""
    start: float
    length: int
    batch: int


CURRICULUM = (Phase(0.0, 256, 8), Phase(0.6, 1024, 2))


def phase_at(curriculum: tuple[Phase, ...], step: int, steps: int) -> Phase:
    return [p for p in curriculum if p.start * steps <= step][-1]


def training_files() -> list[pathlib.Path]:
    """The standard library's Python sources but its tests, third-party packages, the codec
    tables of encodings/ (data, not code) and the held-out files, in a seeded order."""
    held = {STDLIB / name for name in HELD_OUT}
    files = [p for p in sorted(STDLIB.rglob("*.py"))
             if not {"site-packages", "test", "tests", "encodings"} & set(p.relative_to(STDLIB).parts) and p not in held]
    random.Random(0).shuffle(files)
    return files


def token_stream(tokenizer, eos: int) -> torch.Tensor:
    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in training_files()]
    ids = [i for enc in tokenizer.backend_tokenizer.encode_batch(texts) for i in [*enc.ids, eos]]
    return torch.tensor(ids, dtype=torch.long)


def fit_bigram(model, data: torch.Tensor, steps: int, lr: float = 0.03) -> None:
    """Fits the embeddings, the final norm and the LM head, read as a bigram model (the layers
    left out), to every token pair of the corpus: a few full-batch steps."""
    vocab = model.config.vocab_size
    counts = torch.bincount(data[:-1] * vocab + data[1:], minlength=vocab * vocab).view(vocab, vocab).float()
    rows = counts.sum(dim=1).nonzero().squeeze(1)
    weights = counts[rows] / counts.sum()
    embed, head, norm = model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm
    opt = torch.optim.Adam([embed, head, norm.weight], lr=lr)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_fast_bf16()):
            logits = norm(embed[rows]) @ head.T
        loss = -(weights * logits.float().log_softmax(dim=-1)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()


def train(model, data: torch.Tensor, steps: int, curriculum: tuple[Phase, ...] = CURRICULUM, lr: float = 2e-3,
          warmup: int = 50, seed: int = 0, log=print) -> None:
    """AdamW on random windows of the corpus, as long as `curriculum` says, warm-up then cosine decay."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * cosine
        phase = phase_at(curriculum, step, steps)
        starts = torch.randint(0, len(data) - phase.length, (phase.batch,), generator=gen)
        x = torch.stack([data[s:s + phase.length] for s in starts.tolist()])
        # bfloat16 where the CPU computes it natively (AMX, AVX512-BF16); float32 elsewhere: the
        # same steps either way, so the same quality, only the time differs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_fast_bf16()):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}/{steps} ({phase.batch} x {phase.length} tokens): loss {loss.item():.2f} "
                f"({time.monotonic() - start:.0f} s)")
    model.eval()


def _fast_bf16() -> bool:
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


@torch.no_grad()
def widen(small, big, seed: int = 0) -> None:
    """Writes `small`'s function into `big`, which has the same layers and head size but r times
    its residual width, attention heads and MLP neurons, so that every weight of `big` is used.

    Heads and neurons are copied r times, and whatever reads the copies' outputs divided by r.
    The residual stream h becomes P h, P a random matrix of orthonormal columns, so every
    dimension of the wide stream carries it; RMSNorm of P h is sqrt(r) times P applied to the
    narrow norm, so each norm's weight is folded into the layers that read it, with 1 / sqrt(r),
    and set to 1; the layers that write the stream are multiplied by P."""
    narrow, wide = small.config.hidden_size, big.config.hidden_size
    r = wide // narrow
    gen = torch.Generator().manual_seed(seed)
    p = torch.linalg.qr(torch.randn(wide, narrow, generator=gen, dtype=torch.float64))[0]

    def reads(dst, src, norm_weight):   # copies of the outputs (heads, neurons), the input rotated
        dst.weight.copy_(torch.cat([src.weight.double() * norm_weight.double() @ p.T / math.sqrt(r)] * r))
        if src.bias is not None:
            dst.bias.copy_(torch.cat([src.bias] * r))

    def writes(dst, src):   # inputs from r copies each, the output rotated
        dst.weight.copy_(p @ torch.cat([src.weight.double() / r] * r, dim=1))

    big.model.embed_tokens.weight.copy_(small.model.embed_tokens.weight.double() @ p.T)
    for s, b in zip(small.model.layers, big.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            reads(getattr(b.self_attn, name), getattr(s.self_attn, name), s.input_layernorm.weight)
        writes(b.self_attn.o_proj, s.self_attn.o_proj)
        for name in ("gate_proj", "up_proj"):
            reads(getattr(b.mlp, name), getattr(s.mlp, name), s.post_attention_layernorm.weight)
        writes(b.mlp.down_proj, s.mlp.down_proj)
        for name in ("q_norm", "k_norm"):   # Qwen3's per-head norms: the head size is unchanged
            if hasattr(s.self_attn, name):
                getattr(b.self_attn, name).weight.copy_(getattr(s.self_attn, name).weight)
        b.input_layernorm.weight.fill_(1.0)
        b.post_attention_layernorm.weight.fill_(1.0)
    big.lm_head.weight.copy_(small.lm_head.weight.double() * small.model.norm.weight.double() @ p.T / math.sqrt(r))
    big.model.norm.weight.fill_(1.0)


def train_into(big, tokenizer, narrow: int, steps: int, bigram_steps: int = 40, seed: int = 0, log=print) -> None:
    """Trains a `narrow`-wide copy of big's architecture on the standard library, then widens it into big."""
    c = big.config
    r = c.hidden_size // narrow
    if c.hidden_size % narrow or c.num_attention_heads % r or c.num_key_value_heads % r or c.intermediate_size % r:
        raise ValueError(f"the trained width {narrow} must divide the hidden size, heads, KV heads and MLP by one factor")
    config = c.to_dict()
    config.update(hidden_size=narrow, num_attention_heads=c.num_attention_heads // r,
                  num_key_value_heads=c.num_key_value_heads // r, intermediate_size=c.intermediate_size // r,
                  head_dim=c.hidden_size // c.num_attention_heads, initializer_range=0.02)
    small_config = type(big.config).from_dict(config)
    torch.manual_seed(seed)
    small = type(big)(small_config).float()
    data = token_stream(tokenizer, big.config.eos_token_id)
    log(f"training a {narrow}-wide model on {len(data)} standard-library tokens: bigram fit, then {steps} steps")
    fit_bigram(small, data, bigram_steps)
    train(small, data, steps, seed=seed, log=log)
    widen(small, big, seed)
