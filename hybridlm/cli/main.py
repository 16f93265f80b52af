"""The ``hybridlm`` command line.

    hybridlm show SPEC          block table and accounting
    hybridlm validate SPEC...   check specs; exit 2 on the first invalid one
    hybridlm schema             JSON Schema of the spec format
    hybridlm presets            list the built-in presets
    hybridlm generate SPEC --prompt TEXT

SPEC is a YAML file or a preset name (``hybridlm presets``). Errors in a spec are printed as one
line naming the YAML path, without a traceback, and the command exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybridlm.errors import HybridLMError, SpecError


def resolve_spec(arg: str):
    from hybridlm.layouts import load_spec
    from hybridlm.layouts.presets import PRESETS, get_preset

    if Path(arg).exists() or arg.endswith((".yaml", ".yml")):
        return load_spec(arg)
    if arg in PRESETS:
        return get_preset(arg)
    raise SpecError("", f"{arg!r} is neither a spec file nor a preset (presets: {', '.join(PRESETS)})")


def _show(args: argparse.Namespace) -> int:
    from hybridlm.builder import account, format_account

    spec = resolve_spec(args.spec)
    print(f"{spec.name}: d_model {spec.d_model}, vocab {spec.vocab_size}, {spec.n_blocks} blocks, "
          f"pattern {spec.compact_pattern()}")
    print(format_account(account(spec, seq_len=args.seq_len, context=args.context), per_block=not args.summary))
    return 0


def _validate(args: argparse.Namespace) -> int:
    for arg in args.specs:
        spec = resolve_spec(arg)
        print(f"ok  {arg}: {spec.name}, {spec.n_blocks} blocks")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from hybridlm.layouts import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from hybridlm.builder import account
    from hybridlm.builder.accounting import human
    from hybridlm.layouts.presets import PRESETS, get_preset

    for name in PRESETS:
        spec = get_preset(name)
        print(f"{name:22s} {human(account(spec).total_params):>8s}  {spec.compact_pattern()}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from hybridlm.builder import build_model
    from hybridlm.tokenizer import ByteTokenizer

    spec = resolve_spec(args.spec)
    tok = ByteTokenizer()
    if spec.vocab_size < tok.vocab_size:
        raise SpecError("vocab_size", f"the byte tokenizer needs at least {tok.vocab_size} tokens", spec.vocab_size)
    model = build_model(spec, seed=args.seed).eval()
    ids = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    if ids.numel() == 0:
        raise HybridLMError("--prompt must not be empty")
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    new = out[0, ids.shape[1]:].tolist()
    print(f"(random weights, seed {args.seed}) {args.prompt!r} -> {tok.decode(new)!r}")
    print(f"new token ids: {new}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlm", description="Build and study Mamba-3 hybrid language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("show", help="block table and accounting of a spec")
    p.add_argument("spec", help="YAML file or preset name")
    p.add_argument("--seq-len", type=int, default=2048, help="training length for FLOPs (default 2048)")
    p.add_argument("--context", type=int, default=None, help="context for the KV-cache size (default: seq-len)")
    p.add_argument("--summary", action="store_true", help="totals only, no per-block table")
    p.set_defaults(func=_show)

    p = sub.add_parser("validate", help="check specs")
    p.add_argument("specs", nargs="+")
    p.set_defaults(func=_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec format")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=_schema)

    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=_presets)

    p = sub.add_parser("generate", help="generate text (random weights until a trained model is given)")
    p.add_argument("spec")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        print(f"error: invalid spec: {err}", file=sys.stderr)
        return 2
    except HybridLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
