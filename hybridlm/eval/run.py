"""One evaluation end to end, as ``hybridlm eval`` runs it: check that it fits in memory, load the
models, score the grid, print the table, write ``results.json`` (and the plot).

The command line and the studies (:mod:`hybridlm.studies.runner`) both call :func:`run_eval`;
:class:`EvalRequest` is what they ask for, and :meth:`EvalRequest.flags` the same request as
``hybridlm eval`` options (the studies record those, so a run can be repeated by hand).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EvalRequest:
    """What to score: ``tasks`` and ``lengths`` as ``hybridlm eval --task/--lengths`` take them."""

    tasks: str
    lengths: str
    samples: int = 100
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    dtype: str = "float32"
    train_len: int | None = None  # for Nx lengths when a model does not record its training length
    tokenizer: str | None = None  # byte or a tokenizer.json; None: the model folder's, else byte

    def flags(self) -> list[str]:
        """The ``hybridlm eval`` options for this request (device, dtype, train length and tokenizer
        only when they differ from the defaults)."""
        out = ["--task", self.tasks, "--lengths", self.lengths, "--samples", str(self.samples),
               "--batch-size", str(self.batch_size), "--seed", str(self.seed)]
        for flag, value, default in (("--device", self.device, "auto"), ("--dtype", self.dtype, "float32"),
                                     ("--train-len", self.train_len, None), ("--tokenizer", self.tokenizer, None)):
            if value != default:
                out += [flag, str(value)]
        return out

    def check(self) -> None:
        """Fail on a bad task or length before any model is loaded."""
        from hybridlm.eval.harness import parse_lengths
        from hybridlm.eval.tasks import parse_tasks

        parse_tasks(self.tasks)
        parse_lengths(self.lengths)


def run_eval(models: list[str], request: EvalRequest, out: Path, *, quiet: bool = False, plot: bool = True) -> Path:
    """Score ``models`` (model folders, spec files or presets) and write ``out/results.json``
    (and ``out/results.png`` when ``plot``); prints the table. Returns the JSON's path.

    ``quiet``: no progress bar and no per-cell lines. Otherwise a terminal gets a bar and anything
    else (a log file) one line per finished cell on stderr."""
    import torch
    from tqdm.auto import tqdm

    from hybridlm.eval.harness import evaluate, load_eval_model, parse_lengths
    from hybridlm.eval.report import format_table, plot_results, results_document, write_json

    request.check()
    lengths = parse_lengths(request.lengths)
    device = request.device if request.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[request.dtype]
    longest_absolute = max([n.tokens for n in lengths if n.tokens is not None], default=1)
    for arg in models:  # the weights and any absolute length, before anything is allocated
        spec = _model_spec(arg)
        if spec is not None:
            _check_memory(spec, arg, longest_absolute, request, device, dtype)
    loaded = [load_eval_model(m, device=device, dtype=dtype, seed=request.seed, train_seq_len=request.train_len,
                              tokenizer=request.tokenizer) for m in models]
    for m in loaded:  # relative lengths are known once the model's training length is
        longest = max(n.resolve(m.train_seq_len, m.name) for n in lengths)
        _check_memory(m.model.spec, m.name, longest, request, device, dtype, loaded=True)
    names = [m.name for m in loaded]
    for i, m in enumerate(loaded):  # two models with one name would share a table row
        if names.count(m.name) > 1:
            m.name = f"{m.name}#{i + 1}"
    cells = evaluate(loaded, request.tasks, lengths, samples=request.samples, batch_size=request.batch_size,
                     seed=request.seed,
                     progress=None if quiet else partial(tqdm, disable=None),  # no bar when not a terminal
                     on_cell=None if quiet or sys.stderr.isatty() else _print_cell)
    print(format_table(cells))
    settings = {"tasks": request.tasks, "lengths": request.lengths, "samples": request.samples,
                "seed": request.seed, "batch_size": request.batch_size, "device": device, "dtype": request.dtype}
    json_path = write_json(results_document(cells, loaded, settings), out / "results.json")
    plot_path = plot_results(cells, out / "results.png") if plot else None
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot_path else ""))
    return json_path


def folder_spec(path: Path):
    """A model folder's spec, read for a memory estimate; None leaves the error to the loader."""
    from hybridlm.builder.io.pretrained import SPEC_FILE
    from hybridlm.errors import HybridLMError
    from hybridlm.layouts import load_spec

    try:
        return load_spec(path / SPEC_FILE)
    except HybridLMError:
        return None


def _model_spec(arg: str):
    """The spec behind a MODEL argument, for the memory estimate; None when only the loader can tell."""
    from hybridlm.builder.io.pretrained import is_model_folder
    from hybridlm.layouts.presets import spec_or_preset

    if is_model_folder(arg):
        return folder_spec(Path(arg))
    return None if Path(arg).is_dir() else spec_or_preset(arg)


def _check_memory(spec, name: str, tokens: int, request: EvalRequest, device: str, dtype,
                  loaded: bool = False) -> None:
    from hybridlm.builder.model.accounting import check_memory, estimate_memory_bytes

    logit_rows = tokens if "ppl" in request.tasks else 1  # perplexity scores every position
    needed = estimate_memory_bytes(spec, batch_size=request.batch_size, tokens=tokens, logit_rows=logit_rows,
                                   dtype=dtype, include_weights=not loaded)
    check_memory(f"scoring {name} on batches of {request.batch_size} x {tokens} tokens", needed, device,
                 "use shorter --lengths or a smaller --batch-size")


def _print_cell(cell, done: int, total: int) -> None:
    """Progress where no bar is drawn (a log file, CI): one line per finished cell."""
    print(f"eval {done}/{total}: {cell.model} {cell.task}@{cell.length_label} {100 * cell.accuracy:.1f} %",
          file=sys.stderr, flush=True)
