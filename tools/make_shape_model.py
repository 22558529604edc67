"""Writes a model of a real model's shape (layers, widths, heads, vocabulary) with seeded random
weights and the demo model's tokenizer, for benchmarks at a real size. Nothing is downloaded.

The vocabulary keeps the real size, so the embedding and the LM head (tied, as in the real
model) cost what they really cost; the rows past the tokenizer's own size are zero, so their
logits are 0 while the largest real logit is well above it: greedy tokens stay ones the
tokenizer can decode.

    python tools/make_shape_model.py OUT_DIR [--shape qwen2.5-0.5b] [--tokenizer DIR] [--seed 0]
"""
from __future__ import annotations

import argparse
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = ROOT / "model_repository" / "tiny-qwen2" / "1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Qwen2.5-0.5B's config.json, less what belongs to its own tokenizer (the token ids)
SHAPES = {
    "qwen2.5-0.5b": dict(
        arch="qwen2", num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6),
}


def write_model(out: pathlib.Path, shape: dict, tokenizer_dir: pathlib.Path = DEMO, seed: int = 0) -> int:
    """Writes the model (bfloat16, as real checkpoints ship) and the tokenizer; returns the
    parameter count."""
    import torch
    import transformers

    shape = dict(shape)
    arch, rope_theta = shape.pop("arch"), shape.pop("rope_theta")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the shape's {shape['vocab_size']}")
    eos = tokenizer.eos_token_id
    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    config = config_cls(
        **shape, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
        # as the demo model: a wider init than the usual 0.02 gives peaked next-token
        # distributions, so greedy choices are not near-ties that rounding could flip
        initializer_range=0.08)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer):] = 0   # the LM head too: tied
    model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--tokenizer", type=pathlib.Path, default=DEMO, help="a folder with tokenizer.json (the demo model's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    count = write_model(args.out, SHAPES[args.shape], args.tokenizer, args.seed)
    print(f"wrote {args.shape}'s shape ({count / 1e6:.0f}M parameters, random weights) to {args.out}")


if __name__ == "__main__":
    main()
