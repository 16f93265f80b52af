"""Study 3: trapezoid vs Euler vs half discretization (paper Table 8, scaled).

Three pure Mamba-3 models that differ only in ``discretization`` (trapezoid: the data-dependent
λ_t = σ(u_t) of the paper; half: λ = ½; euler: λ = 1) trained for the same steps on the same
text, byte by byte: the Python standard library's sources and docstrings
(:mod:`hybridlm.studies.corpus`). Compared by training loss at equal steps and by held-out
perplexity through the harness (``ppl:file=``), at the training length and beyond.

    hybridlm study discretization
"""
from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, model_validator

from hybridlm.errors import HybridLMError
from hybridlm.eval.run import EvalRequest
from hybridlm.studies.config import ModelEntry, Strict, StudyConfig, TrainSettings
from hybridlm.studies.corpus import MAX_BYTES, build_corpus, read_manifest, verify_corpus
from hybridlm.studies.plots import Panel, plot_panels, smooth
from hybridlm.studies.runner import Run
from hybridlm.studies.tables import environment_lines, markdown_table, mean, training_table

NAME = "discretization"
# Paper Table 8 (440M, Chinchilla tokens, FineWeb-Edu test perplexity), for reference.
PAPER = {"trapezoid": 15.72, "half": 15.76, "euler": 15.81}
LOSS_WINDOW = 0.05  # "loss at step s": the mean of the logged losses in the last 5 % of steps up to s


class PplEval(Strict):
    lengths: str  # harness lengths, multiples of the training length
    samples: int = Field(gt=0)  # windows of the held-out text per length
    batch_size: int = Field(gt=0)


class Config(StudyConfig):
    corpus: str  # folder of `python -m hybridlm.studies.corpus`; built here on first use
    corpus_max_bytes: int = Field(default=MAX_BYTES, gt=0)
    corpus_valid_bytes: int | None = Field(default=None, gt=0)  # default: corpus.VALID_BYTES
    seeds: list[int] = Field(min_length=1)
    models: dict[str, ModelEntry]
    train: TrainSettings
    eval: PplEval

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        from hybridlm.eval.harness import parse_lengths

        try:
            parse_lengths(self.eval.lengths)
        except HybridLMError as err:
            raise ValueError(str(err)) from None
        self.check_files([m.spec for m in self.models.values()])
        return self


def prepare(cfg: Config, out: Path, look_only: bool) -> dict:
    """Build the corpus on first use (or check a carried one); its identity goes into every run."""
    folder = Path(cfg.corpus)
    if not (folder / "manifest.json").is_file():
        if look_only:
            return {"corpus": cfg.corpus, "corpus_sha256": "(built on the first real run)"}
        build_corpus(folder, max_bytes=cfg.corpus_max_bytes, valid_bytes=cfg.corpus_valid_bytes)
    manifest = verify_corpus(folder)
    return {"corpus": cfg.corpus, "corpus_sha256": manifest["train"]["sha256"], "corpus_python": manifest["python"]}


def plan(cfg: Config, finished: dict[str, dict], *, preview: bool = False, extra_meta: dict | None = None):
    from hybridlm.studies.driver import Plan

    corpus = Path(cfg.corpus)
    runs = []
    for seed in cfg.seeds:
        for model, entry in cfg.models.items():
            flags = cfg.train.flags() + ["--hybrid.data", str(corpus / "train.jsonl"), "--hybrid.seed", str(seed)]
            request = EvalRequest(f"ppl:file={corpus / 'valid.txt'}", cfg.eval.lengths, samples=cfg.eval.samples,
                                  batch_size=cfg.eval.batch_size, seed=seed)
            meta = {"model": model, "spec": entry.spec, "seed": seed, **(extra_meta or {})}
            runs.append(Run(f"{model}-seed{seed}", cfg.path(entry.spec), flags, request, cfg.train.steps,
                            cfg.train.tokens_per_step, meta))
    return Plan(runs)


def loss_at(losses: list[list[float]], step: int, window: float = LOSS_WINDOW) -> float | None:
    """Mean logged loss over the last ``window`` fraction of steps up to ``step`` (one logged step is
    noisy: it is one batch)."""
    lo = step * (1 - window)
    values = [v for s, v in losses if lo <= s <= step]
    return mean(values)


def summarize(cfg: Config, finished: dict[str, dict], out: Path, sessions: list[dict]):
    from hybridlm.studies.driver import Summary

    by_model = {m: [r for r in finished.values() if r["meta"]["model"] == m and r["meta"]["seed"] in cfg.seeds]
                for m in cfg.models}
    by_model = {m: rs for m, rs in by_model.items() if rs}
    steps = cfg.train.steps
    checkpoints = [steps // 4, steps // 2, 3 * steps // 4, steps]
    labels = list(dict.fromkeys(c["length_label"] for rs in by_model.values() for r in rs for c in r["eval"]))
    parts = [f"### {cfg.title}"]
    manifest = _manifest(cfg)
    if manifest:
        parts.append(f"Corpus: `{cfg.corpus}`, built by Python {manifest['python']}: "
                     f"{manifest['train']['documents']} training documents, {manifest['train']['bytes']:,} bytes "
                     f"(sha256 `{manifest['train']['sha256'][:16]}…`); "
                     f"held out {manifest['valid']['bytes']:,} bytes.")
    head = (["model", "seeds"] + [f"train loss @ {s:,}" for s in checkpoints]
            + [f"held-out ppl @ {n}" for n in labels] + [f"bits/byte @ {labels[0]}" if labels else "bits/byte"])
    rows, data = [], {"train_loss": {}, "perplexity": {}}
    for model, records in by_model.items():
        row = [cfg.models[model].label, ",".join(str(r["meta"]["seed"]) for r in records)]
        for s in checkpoints:
            values = [loss_at(r["train"]["losses"], s) for r in records]
            row.append(_mean_spread(values, 4))
            data["train_loss"][f"{model}@{s}"] = mean(values)
        for n in labels:
            values = [c["perplexity"] for r in records for c in r["eval"] if c["length_label"] == n]
            row.append(_mean_spread(values, 3))
            data["perplexity"][f"{model}@{n}"] = mean(values)
        first = mean([c["perplexity"] for r in records for c in r["eval"] if labels and c["length_label"] == labels[0]])
        row.append(f"{math.log2(first):.4f}" if first else None)
        rows.append(row)
    parts.append(f"Training loss (nats/byte; mean of the logged steps in the last {LOSS_WINDOW:.0%} up to the step) "
                 f"and held-out perplexity per byte (harness `ppl`, {cfg.eval.samples} windows a length); "
                 "± is half the spread between seeds:")
    parts.append(markdown_table(head, rows))
    parts.append("Paper Table 8 (440M, FineWeb-Edu test perplexity), for reference: "
                 + ", ".join(f"{k} {v}" for k, v in PAPER.items()))
    parts.append(training_table([(f"{cfg.models[r['meta']['model']].label}, seed {r['meta']['seed']}", r)
                                 for rs in by_model.values() for r in rs]))
    plots = _plots(cfg, by_model, labels, out)
    parts.append("Runs recorded:\n" + environment_lines(sessions))
    return Summary("\n\n".join(parts), plots, data)


def _manifest(cfg: Config) -> dict | None:
    try:
        return read_manifest(cfg.corpus)
    except Exception:  # summarizing elsewhere (results carried without the corpus): leave it out
        return None


def _mean_spread(values: list[float | None], digits: int) -> str | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = sum(values) / len(values)
    return f"{m:.{digits}f}" + (f" ± {(max(values) - min(values)) / 2:.{digits}f}" if len(values) > 1 else "")


def _plots(cfg: Config, by_model: dict[str, list[dict]], labels: list[str], out: Path) -> list[Path]:
    if not by_model:
        return []
    curves, tails = {}, {}
    for model, records in by_model.items():
        for r in records:
            name = cfg.models[model].label + (f" (seed {r['meta']['seed']})" if len(cfg.seeds) > 1 else "")
            steps = [s for s, _ in r["train"]["losses"]]
            values = smooth([v for _, v in r["train"]["losses"]], alpha=0.05)
            curves[name] = (steps, values)
            half = len(steps) // 2
            tails[name] = (steps[half:], values[half:])
    loss_panels = [Panel("training loss", curves, "step", "loss (nats/byte, smoothed)", ylog=True),
                   Panel("second half of training", tails, "step", "loss (nats/byte, smoothed)")]
    plots = [plot_panels(loss_panels, out / "discretization-loss.png", cfg.title)]
    ppl = {}
    for model, records in by_model.items():
        per_length = [mean([c["perplexity"] for r in records for c in r["eval"] if c["length_label"] == n])
                      for n in labels]
        ppl[cfg.models[model].label] = (list(range(len(labels))), per_length)
    panel = Panel("held-out perplexity (Python stdlib text)", ppl, "evaluation length", "perplexity per byte",
                  xticks=list(range(len(labels))), xticklabels=labels)
    plots.append(plot_panels([panel], out / "discretization-ppl.png"))
    return [p for p in plots if p]
