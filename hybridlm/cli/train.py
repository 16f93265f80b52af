"""``hybridlm train`` and ``hybridlm export``: torchtitan under the hood, started the right way.

    hybridlm train SPEC [--config cpu-debug|1gpu|2gpu-fsdp|FILE.toml] [--nproc N] [torchtitan flags...]
    hybridlm export CHECKPOINT --out DIR [--overwrite]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from hybridlm.errors import HybridLMError

CONFIG_DIRS = (Path("specs/train"), Path(__file__).resolve().parents[2] / "specs" / "train")


def resolve_config(name: str | None) -> Path:
    """A TOML path, or a config name looked up in ./specs/train and the source tree's specs/train."""
    if name is None:
        import torch

        name = "1gpu" if torch.cuda.is_available() else "cpu-debug"
    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise HybridLMError(f"--config {name}: no such file")
        return path
    for folder in CONFIG_DIRS:
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    known = sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.toml")})
    raise HybridLMError(f"--config {name}: not a .toml file nor a known config ({', '.join(known) or 'none found'})")


def add_parsers(sub) -> None:
    from hybridlm.cli.main import positive_int

    p = sub.add_parser("train", help="train a spec with torchtitan (CPU, one GPU, several GPUs)",
                       description="Train SPEC with torchtitan. Flags this command does not know go to torchtitan "
                                   "(e.g. --training.steps 200 --hybrid.data task:niah-1).",
                       epilog=hybrid_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="YAML spec or preset name")
    p.add_argument("--titan-help", action="store_true", help="list every torchtitan flag (with its default) and stop")
    p.add_argument("--config", default=None,
                   help="cpu-debug, 1gpu, 2gpu-fsdp or a .toml file (default: 1gpu with CUDA, else cpu-debug)")
    p.add_argument("--nproc", type=positive_int, default=1, help="ranks on this machine (torchrun underneath when > 1)")
    p.set_defaults(func=train, passthrough=True)

    p = sub.add_parser("export", help="turn a training checkpoint into a model folder",
                       description="Write safetensors + spec + tokenizer + training length (+ config.json) from a "
                                   "DCP checkpoint: a step-N folder, or a run's dump folder (its newest step).")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="model folder to write (created; see --overwrite)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--overwrite", action="store_true", help="replace --out when it is already a model folder")
    p.set_defaults(func=export)


def titan_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    from hybridlm.layouts.presets import spec_or_preset

    spec_or_preset(args.spec)  # a bad spec fails here, in one line, not inside torchtitan
    return ["--job.config_file", str(resolve_config(args.config)), "--hybrid.spec", args.spec, *extra]


def hybrid_options_help() -> str:
    """The [hybrid] options with their defaults and help, read from hybridlm/titan/job_config.py (the
    attribute docstrings torchtitan's parser shows too), so the two never drift apart."""
    import ast
    import inspect
    import textwrap

    from hybridlm.titan import job_config

    tree = ast.parse(inspect.getsource(job_config))
    hybrid = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Hybrid")
    lines = ["hybridlm's own options (the [hybrid] section of a config file, or --hybrid.NAME VALUE):"]
    body = hybrid.body
    for field, doc in zip(body, body[1:]):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            name, default = field.target.id, ast.literal_eval(field.value)
            text = " ".join(doc.value.value.split())
            lines.append(f"  --hybrid.{name} (default {default!r})")
            lines += textwrap.wrap(text, 96, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "Every other flag goes to torchtitan (--training.steps, --optimizer.lr, --job.dump_folder, ...):",
              "`hybridlm train --titan-help` lists them all. Output: one line per logged step; "
              "--hybrid.log torchtitan for torchtitan's own log."]
    return "\n".join(lines)


def train(args: argparse.Namespace, extra: list[str]) -> int:
    """Exit status: 0 trained, 2 a bad spec / flag / config / data source (one line), 130 Ctrl-C."""
    from hybridlm.titan.launch import check_config, main as launch, print_titan_help, run_ranks, with_defaults

    if args.titan_help:
        return print_titan_help()
    if not args.spec:
        raise HybridLMError("hybridlm train needs a SPEC (a YAML file or a preset name: `hybridlm presets`)")

    argv = titan_argv(args, extra)
    if args.nproc == 1 and "LOCAL_RANK" not in os.environ:
        return launch(argv)
    check_config(with_defaults(argv))  # a bad flag or config: one line here, not one per rank
    return run_ranks(args.nproc, argv)


def export(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    import torch

    from hybridlm.titan.export import export_checkpoint

    from hybridlm.cli.main import check_out_folder

    check_out_folder("--out", args.out)  # a file there fails now, before the checkpoint is read
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    out = export_checkpoint(args.checkpoint, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
