"""`distattn convert hf-to-distattn | distattn-to-hf SRC OUT`: argument parsing and the commands."""
from __future__ import annotations

import importlib.util

from distattn.cli_args import HelpFormatter, UsageError


def _need_hf() -> None:
    missing = [m for m in ("safetensors", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"needs {' and '.join(missing)}: pip install 'distattn[hf]'")


def cmd_hf_to_distattn(args) -> int:
    _need_hf()
    from distattn.hf.convert import hf_to_distattn
    for note in hf_to_distattn(args.src, args.out, overwrite=args.overwrite):
        print(f"note: {note}")
    print(f"wrote {args.out} (train from it with --set model.init_from={args.out})")
    return 0


def cmd_distattn_to_hf(args) -> int:
    _need_hf()
    from distattn.hf.convert import distattn_to_hf
    fam = distattn_to_hf(args.src, args.out, fam=args.family, overwrite=args.overwrite)
    print(f"wrote {args.out} ({fam}; load it with transformers' AutoModelForCausalLM.from_pretrained)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face (Llama, Qwen2, Mistral) and "
                                       "distattn", formatter_class=HelpFormatter)
    csub = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    a = csub.add_parser("hf-to-distattn", formatter_class=HelpFormatter,
                        help="a Hugging Face model directory -> a distattn model checkpoint")
    a.add_argument("src", help="Hugging Face model directory (config.json + safetensors)")
    a.add_argument("out", help="new distattn checkpoint directory")
    a.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a.set_defaults(fn=cmd_hf_to_distattn)
    b = csub.add_parser("distattn-to-hf", formatter_class=HelpFormatter,
                        help="a distattn checkpoint (converted, a training step, or a run directory) -> "
                             "a Hugging Face model directory")
    b.add_argument("src", help="distattn checkpoint: a converted directory, runs/<name>/checkpoints/step_N, "
                               "or runs/<name> for its latest")
    b.add_argument("out", help="new Hugging Face model directory")
    b.add_argument("--family", choices=("llama", "qwen2", "mistral"), default=None,
                   help="architecture to write (default: the source's, else qwen2 with q/k/v biases, "
                        "else llama)")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    b.set_defaults(fn=cmd_distattn_to_hf)
