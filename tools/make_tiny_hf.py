"""Save a tiny random Hugging Face model (Llama, Qwen2 or Mistral) to try conversion and init_from offline.

    .venv/bin/python tools/make_tiny_hf.py OUT [--family llama|qwen2|mistral] [--vocab 256]
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="new model directory")
    ap.add_argument("--family", choices=("llama", "qwen2", "mistral"), default="llama")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary (256 covers byte-level data)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch
    import transformers
    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
             "mistral": ("MistralConfig", "MistralForCausalLM")}[args.family]
    torch.manual_seed(args.seed)
    cfg = getattr(transformers, names[0])(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2, vocab_size=args.vocab,
                                          max_position_embeddings=512)
    getattr(transformers, names[1])(cfg).save_pretrained(args.out)
    print(f"wrote {args.out} ({args.family}, {sum(1 for _ in cfg.to_dict())} config fields)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
