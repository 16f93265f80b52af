"""Train the 5:1 hybrid on a local text corpus with torchtitan, export it, and generate from it.

    python examples/train_text_and_generate.py [--data corpus.jsonl] [--steps 300] [--tiny]

Without --data it writes a small corpus of Python standard-library docstrings (no download).
The three steps are the command line a user runs (`hybridlm train`, `hybridlm export`), then the
Python API (`hybridlm.load`, `generate`). On a GPU use `--config 1gpu` and a larger spec.
"""
import argparse
import inspect
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import hybridlm


def write_corpus(path: Path) -> Path:
    """One JSON line per documented object of a few standard modules."""
    import collections
    import json as json_module
    import pathlib
    import textwrap

    with path.open("w") as f:
        for module in (collections, json_module, pathlib, textwrap, inspect):
            for name, obj in vars(module).items():
                doc = inspect.getdoc(obj) if not name.startswith("_") else None
                if doc:
                    f.write(json.dumps({"text": f"{module.__name__}.{name}: {doc}"}) + "\n")
    return path


def hybridlm_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hybridlm.cli.main", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", help="a text / JSON-lines file or folder (default: a small docstring corpus)")
    parser.add_argument("--spec", default="hybrid-tiny", help="spec file or preset (default hybrid-tiny, 5:1)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", default=None, help="folder for the run and the model (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="a few steps at a short length (what CI runs)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="hybridlm-example-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else write_corpus(work / "corpus.jsonl")
    steps, seq_len = (4, 64) if args.tiny else (args.steps, 256)
    hybridlm_cli("train", args.spec, "--config", "cpu-debug", "--hybrid.data", str(data),
                 "--training.steps", str(steps), "--training.seq_len", str(seq_len),
                 "--training.local_batch_size", "4", "--checkpoint.interval", str(steps),
                 "--job.dump_folder", str(work / "run"))
    hybridlm_cli("export", str(work / "run"), "--out", str(work / "model"))
    loaded = hybridlm.load(work / "model")
    tok = loaded.tokenizer
    prompt = torch.tensor(tok.encode("collections.OrderedDict: "), dtype=torch.long)
    out = loaded.model.generate(prompt, max_new_tokens=48, temperature=0.0)
    print(f"model folder: {work / 'model'} (trained {steps} steps at length {seq_len})")
    print(repr(tok.decode(out[prompt.numel():].tolist())))


if __name__ == "__main__":
    main()
