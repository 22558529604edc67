"""Writes a transformers-format causal LM and its byte-level BPE tokenizer.

Nothing is downloaded: the tokenizer is trained on this Python's own standard-library sources,
and the weights are seeded random ones or, with --train-steps, trained on the same sources
(tools/train_demo_model.py: `make demo-model`, minutes on two cores). Tests and benchmarks that
need a model of a given size fast take the random weights.

    python tools/make_demo_model.py OUT_DIR [--layers 8 --hidden 512 ...] [--train-steps 550 --train-hidden 128]
"""
from __future__ import annotations

import argparse
import pathlib
import sysconfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen2's tokenizers carry it: OpenAI chat requests are rendered with it.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")


def corpus(max_bytes: int):
    """Yields standard-library source files in a fixed order, up to max_bytes in all."""
    total = 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        total += len(text)
        yield text
        if total >= max_bytes:
            return


def train_tokenizer(vocab_size: int, max_bytes: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(max_bytes), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--arch", choices=["qwen2", "llama", "qwen3"], default="qwen2")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-bytes", type=int, default=6_000_000)
    ap.add_argument("--train-steps", type=int, default=0, help="train this many steps (0: random weights)")
    ap.add_argument("--train-hidden", type=int, default=256, help="the residual width trained, then widened")
    args = ap.parse_args()

    import torch
    import transformers

    tokenizer = train_tokenizer(args.vocab, args.corpus_bytes)
    tokenizer.chat_template = CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
                  "qwen3": transformers.Qwen3Config}[args.arch]
    model_cls = {"qwen2": transformers.Qwen2ForCausalLM, "llama": transformers.LlamaForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[args.arch]
    config = config_cls(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=False,
        # A wider init than the usual 0.02 gives peaked next-token distributions, so greedy
        # choices are not near-ties that rounding could flip between implementations.
        initializer_range=0.08)
    torch.manual_seed(args.seed)
    model = model_cls(config).to(torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # transformers loads a qwen2 folder with its Qwen2 tokenizer class, which brings its own
    # pre-tokenizer and normalizer; write those into tokenizer.json so that every reader of the
    # file (the front end's `tokenizers`, for cache-aware routing) splits text the same way.
    served = transformers.AutoTokenizer.from_pretrained(args.out)
    served.backend_tokenizer.save(str(args.out / "tokenizer.json"))
    if args.train_steps:   # on text split as the server splits it
        import train_demo_model
        train_demo_model.train_into(model, served, args.train_hidden, args.train_steps, seed=args.seed)
        model.save_pretrained(args.out, safe_serialization=True)
    print(f"wrote {args.arch} model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) to {args.out}")


if __name__ == "__main__":
    main()
