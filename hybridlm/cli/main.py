"""The ``hybridlm`` command line.

    hybridlm show SPEC          block table and accounting
    hybridlm validate SPEC...   check specs; exit 2 on the first invalid one
    hybridlm schema             JSON Schema of the spec format
    hybridlm presets            list the built-in presets
    hybridlm generate SPEC --prompt TEXT
    hybridlm eval MODEL... --task niah-1,mqar --lengths 1x,2x,4x,8x
    hybridlm train SPEC [--config cpu-debug] [--nproc N] [torchtitan flags]
    hybridlm export CHECKPOINT --out DIR
    hybridlm import-mamba-ssm SRC --out DIR
    hybridlm study NAME [--quick] [--dry-run]   small-scale reproductions of the paper (docs/results.md)

SPEC is a YAML file or a preset name (``hybridlm presets``). Errors in a spec are printed as one
line naming the YAML path, without a traceback, and the command exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybridlm.errors import HybridLMError, SpecError
from hybridlm.layouts.presets import spec_or_preset


def _show(args: argparse.Namespace) -> int:
    from hybridlm.builder import account, format_account

    spec = spec_or_preset(args.spec)
    print(f"{spec.name}: d_model {spec.d_model}, vocab {spec.vocab_size}, {spec.n_blocks} blocks, "
          f"pattern {spec.compact_pattern()}")
    print(format_account(account(spec, seq_len=args.seq_len, context=args.context), per_block=not args.summary))
    return 0


def _validate(args: argparse.Namespace) -> int:
    for arg in args.specs:
        spec = spec_or_preset(arg)
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

    spec = spec_or_preset(args.spec)
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


def _eval(args: argparse.Namespace) -> int:
    import torch
    from functools import partial

    from tqdm.auto import tqdm

    from hybridlm.eval import (evaluate, format_table, load_eval_model, parse_lengths, plot_results,
                               results_document, write_json)
    from hybridlm.eval.tasks import parse_tasks

    parse_tasks(args.task)  # fail on a bad task before loading any model
    lengths = parse_lengths(args.lengths)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    models = [load_eval_model(m, device=device, dtype=dtype, seed=args.seed, train_seq_len=args.train_len,
                              tokenizer=args.tokenizer) for m in args.models]
    names = [m.name for m in models]
    for i, m in enumerate(models):  # two models with one name would share a table row
        if names.count(m.name) > 1:
            m.name = f"{m.name}#{i + 1}"
    cells = evaluate(models, args.task, lengths, samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                     progress=None if args.quiet else partial(tqdm, disable=None))  # no bar when not a terminal
    print(format_table(cells))
    out = Path(args.out)
    settings = {"tasks": args.task, "lengths": args.lengths, "samples": args.samples, "seed": args.seed,
                "batch_size": args.batch_size, "device": device, "dtype": args.dtype}
    json_path = write_json(results_document(cells, models, settings), out / "results.json")
    plot_path = None if args.no_plot else plot_results(cells, out / "results.png")
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot_path else ""))
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

    p = sub.add_parser("eval", help="retrieval / state-tracking / perplexity at several lengths",
                       description="Score models on tasks at several lengths; print a table, write "
                                   "results.json and results.png. MODEL is a model folder or a spec "
                                   "(random weights, for smoke runs).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folder, spec file or preset")
    p.add_argument("--task", required=True,
                   help="comma-separated tasks with options, e.g. niah-1,niah-2:digits=4,mqar:pairs=8 "
                        "(niah-1, niah-2, niah-3, mqar, parity, arith, arith-brackets, ppl:file=PATH)")
    p.add_argument("--lengths", required=True, help="e.g. 1x,2x,4x,8x (times the training length) or 256,512")
    p.add_argument("--samples", type=int, default=100, help="examples per task and length (default 100)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seeds the examples and random-weight models")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--train-len", type=int, default=None,
                   help="training length for Nx lengths when a model does not record one")
    p.add_argument("--tokenizer", default=None, help="byte or a tokenizer.json (default: the model folder's, else byte)")
    p.add_argument("--out", default="eval-results", help="folder for results.json and results.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)

    from hybridlm.cli.train import add_parsers as add_train_parsers

    add_train_parsers(sub)

    from hybridlm.cli.import_mamba_ssm import add_parser as add_import_mamba_ssm_parser

    add_import_mamba_ssm_parser(sub)

    from hybridlm.cli.study import add_parser as add_study_parser

    add_study_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)
    except SpecError as err:
        print(f"error: invalid spec: {err}", file=sys.stderr)
        return 2
    except HybridLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `hybridlm show ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
