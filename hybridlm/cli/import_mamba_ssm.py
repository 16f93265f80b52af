"""``hybridlm import-mamba-ssm SRC --out DIR``: a mamba_ssm MambaLMHeadModel folder -> a hybridlm model folder."""
from __future__ import annotations

import argparse
import json


def _import_mamba_ssm(args: argparse.Namespace) -> int:
    from hybridlm.builder.io.mamba_ssm import import_mamba_ssm
    from hybridlm.builder.io.pretrained import META_FILE, SPEC_FILE
    from hybridlm.cli.main import _pattern_text, check_out_folder
    from hybridlm.layouts import load_spec

    check_out_folder("--out", args.out)  # before the source is read
    out = import_mamba_ssm(args.src, args.out, train_seq_len=args.train_len, tokenizer=args.tokenizer,
                           overwrite=args.overwrite)
    spec = load_spec(out / SPEC_FILE)
    # Say which tokenizer was recorded: without SRC/tokenizer.json or --tokenizer it is the byte one.
    tokenizer = json.loads((out / META_FILE).read_text())["tokenizer"]["kind"]
    print(f"imported {args.src} -> {out}: {spec.n_blocks} blocks, pattern {_pattern_text(spec)}, "
          f"vocab {spec.vocab_size}, tokenizer {tokenizer}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from hybridlm.cli.main import positive_int

    p = subparsers.add_parser(
        "import-mamba-ssm", help="convert a mamba_ssm MambaLMHeadModel folder into a hybridlm model folder",
        description="Read SRC/config.json (MambaConfig fields, ssm_cfg.layer = \"Mamba3\") and "
                    "SRC/model.safetensors or SRC/pytorch_model.bin; write a hybridlm model folder "
                    "(spec.yaml + safetensors) that `hybridlm.load` and `hybridlm eval` read.")
    p.add_argument("src", metavar="SRC", help="mamba_ssm model folder")
    p.add_argument("--out", required=True, metavar="DIR", help="hybridlm model folder to write")
    p.add_argument("--train-len", type=positive_int, default=None,
                   help="training length to record (lets `hybridlm eval` use 1x, 2x ... lengths)")
    p.add_argument("--tokenizer", default=None,
                   help="byte or a tokenizer.json (default: SRC/tokenizer.json if present, else byte)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    p.set_defaults(func=_import_mamba_ssm)
    return p
