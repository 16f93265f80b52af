"""The ``hybridlm`` command line.

    hybridlm show SPEC          block table and accounting
    hybridlm validate SPEC...   check every spec; exit 2 if any is invalid
    hybridlm schema             JSON Schema of the spec format
    hybridlm presets            list the built-in presets
    hybridlm generate MODEL --prompt TEXT   (a model folder, spec or preset)
    hybridlm eval MODEL... --task niah-1,mqar --lengths 1x,2x,4x,8x
    hybridlm train SPEC [--config cpu-debug] [--nproc N] [torchtitan flags]
    hybridlm export CHECKPOINT --out DIR
    hybridlm import-mamba-ssm SRC --out DIR
    hybridlm study NAME [--quick] [--dry-run]   small-scale reproductions of the paper (docs/results.md)

SPEC is a YAML file or a preset name (``hybridlm presets``). Errors in a spec are printed as one
line naming the YAML path, without a traceback, and the command exits with status 2; so do bad
arguments (checked before any model is built or loaded). Ctrl-C exits with status 130.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from hybridlm.errors import HybridLMError, SpecError
from hybridlm.layouts.presets import spec_or_preset

# Above this many blocks `show` prints the pattern as written: finding the shortest repeat is quadratic.
COMPACT_PATTERN_MAX_BLOCKS = 2048


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one HybridLMError line (main prints it, exit 2)."""

    def error(self, message: str):
        raise HybridLMError(f"{message} (see `{self.prog} --help`)")


def _int_at_least(least: int, wanted: str):
    """An argparse type: an integer >= ``least``, else one line saying what is ``wanted``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 = greedy), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def device_name(text: str) -> str:
    """``auto`` or a device torch has here: cpu, cuda, cuda:N, mps."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return text
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine (or this torch build) has no CUDA device; "
                                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are only {torch.cuda.device_count()} CUDA devices "
                                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return text
    if device.type == "mps" and torch.backends.mps.is_available():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not available here: use auto, cpu, cuda or cuda:N")


def check_out_folder(flag: str, out: str | Path) -> Path:
    """``out`` is a folder, or one can be made there; checked before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HybridLMError(f"{flag} {out}: is a file; name a folder (it is created when missing)")
    _check_writable(flag, out)
    return out


def check_out_file(flag: str, out: str | Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise HybridLMError(f"{flag} {out}: is a folder; name a file to write, e.g. {out / 'schema.json'}")
    _check_writable(flag, out)
    return out


def _check_writable(flag: str, out: Path) -> None:
    """The path itself when it exists, else its nearest existing parent, must let us write."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise HybridLMError(f"{flag} {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise HybridLMError(f"{flag} {out}: {existing} is not writable")


def _pattern_text(spec) -> str:
    if spec.n_blocks <= COMPACT_PATTERN_MAX_BLOCKS:
        return spec.compact_pattern()
    return spec.pattern if len(spec.pattern) <= 200 else spec.pattern[:200] + "..."


def _show(args: argparse.Namespace) -> int:
    from hybridlm.builder import account, format_account

    spec = spec_or_preset(args.spec)
    print(f"{spec.name}: d_model {spec.d_model}, vocab {spec.vocab_size}, {spec.n_blocks} blocks, "
          f"pattern {_pattern_text(spec)}")
    print(format_account(account(spec, seq_len=args.seq_len, context=args.context), per_block=not args.summary))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Every file is checked; each gets its line, and any failure makes the exit status 2."""
    failed = 0
    for arg in args.specs:
        try:
            spec = spec_or_preset(arg)
        except HybridLMError as err:
            failed += 1
            what = "invalid spec: " if isinstance(err, SpecError) else ""
            print(f"error: {arg}: {what}{err}", file=sys.stderr)
            continue
        print(f"ok  {arg}: {spec.name}, {spec.n_blocks} blocks")
    return 2 if failed else 0


def _schema(args: argparse.Namespace) -> int:
    from hybridlm.layouts import spec_json_schema

    out = check_out_file("--out", args.out) if args.out else None
    text = json.dumps(spec_json_schema(), indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}")
    else:
        print(text)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from hybridlm.builder import account
    from hybridlm.builder.model.accounting import human
    from hybridlm.layouts.presets import PRESETS, get_preset

    for name in PRESETS:
        spec = get_preset(name)
        print(f"{name:22s} {human(account(spec).total_params):>8s}  {spec.compact_pattern()}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from hybridlm.builder import build_model
    from hybridlm.builder.model.accounting import check_memory, estimate_memory_bytes
    from hybridlm.builder.io.pretrained import is_model_folder, load_pretrained
    from hybridlm.eval.run import folder_spec
    from hybridlm.tokenizer import ByteTokenizer

    folder = Path(args.spec) if is_model_folder(args.spec) else None
    if folder is None and Path(args.spec).is_dir():
        raise HybridLMError(f"{args.spec} is a folder but not a hybridlm model folder (no hybridlm.json): give a "
                            "model folder (`hybridlm export`), a spec file or a preset")
    spec = folder_spec(folder) if folder else spec_or_preset(args.spec)
    tok = ByteTokenizer()
    if folder is None and spec.vocab_size < tok.vocab_size:
        raise SpecError("vocab_size", f"the byte tokenizer needs at least {tok.vocab_size} tokens", spec.vocab_size)
    if spec is not None:  # before the weights and the cache are allocated
        prompt = len(args.prompt.encode())  # its bytes bound its tokens under any tokenizer
        check_memory(f"generating {args.max_new_tokens} tokens with {spec.name}",
                     estimate_memory_bytes(spec, tokens=prompt, cache_tokens=prompt + args.max_new_tokens), "cpu",
                     "lower --max-new-tokens or use a smaller model")
    if folder:
        loaded = load_pretrained(folder)
        model, tok, source = loaded.model, loaded.tokenizer, str(folder)
        spec = loaded.spec
    else:
        model, source = build_model(spec, seed=args.seed).eval(), f"random weights, seed {args.seed}"
    ids = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    if ids.numel() == 0:
        raise HybridLMError("--prompt must not be empty")
    if int(ids.max()) >= spec.vocab_size or int(ids.min()) < 0:
        raise HybridLMError(f"the tokenizer gives token id {int(ids.max())} for --prompt, outside the model's "
                            f"vocab_size {spec.vocab_size}: the tokenizer does not belong to this model")
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    new = out[0, ids.shape[1]:].tolist()
    print(f"({source}) {args.prompt!r} -> {tok.decode(new)!r}")
    print(f"new token ids: {new}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hybridlm.eval.run import EvalRequest, run_eval

    request = EvalRequest(tasks=args.task, lengths=args.lengths, samples=args.samples, batch_size=args.batch_size,
                          seed=args.seed, device=args.device, dtype=args.dtype, train_len=args.train_len,
                          tokenizer=args.tokenizer)
    request.check()  # a bad task or length fails before the --out check and before any model loads
    out = check_out_folder("--out", args.out)
    run_eval(args.models, request, out, quiet=args.quiet, plot=not args.no_plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hybridlm", description="Build and study Mamba-3 hybrid language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("show", help="block table and accounting of a spec")
    p.add_argument("spec", help="YAML file or preset name")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="training length for FLOPs (default 2048)")
    p.add_argument("--context", type=positive_int, default=None,
                   help="context for the KV-cache size (default: seq-len)")
    p.add_argument("--summary", action="store_true", help="totals only, no per-block table")
    p.set_defaults(func=_show)

    p = sub.add_parser("validate", help="check specs (each one; exit 2 if any is invalid)")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.set_defaults(func=_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec format")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=_schema)

    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=_presets)

    p = sub.add_parser("generate", help="generate text (random weights until a trained model is given)")
    p.add_argument("spec", metavar="MODEL", help="model folder (its weights and tokenizer), spec file or preset "
                                                 "(random weights, byte tokenizer)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=temperature, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=None, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="retrieval / state-tracking / perplexity at several lengths",
                       description="Score models on tasks at several lengths; print a table, write "
                                   "results.json and results.png. MODEL is a model folder or a spec "
                                   "(random weights, for smoke runs).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folder, spec file or preset")
    p.add_argument("--task", required=True,
                   help="comma-separated tasks with options, e.g. niah-1,niah-2:digits=4,mqar:pairs=8 "
                        "(niah-1, niah-2, niah-3, mqar, parity, arith, arith-brackets, arith-sum, arith-brackets-sum, "
                        "ppl:file=PATH)")
    p.add_argument("--lengths", required=True, help="e.g. 1x,2x,4x,8x (times the training length) or 256,512")
    p.add_argument("--samples", type=positive_int, default=100, help="examples per task and length (default 100)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seeds the examples and random-weight models")
    p.add_argument("--device", type=device_name, default="auto",
                   help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--train-len", type=positive_int, default=None,
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
    """Run one command: its errors are one line on stderr and exit 2; Ctrl-C is one line and 130."""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "passthrough", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)
    except SpecError as err:
        print(f"error: invalid spec: {err}", file=sys.stderr)
        return 2
    except HybridLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hybridlm show ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
