"""Study configuration: ``specs/studies/<study>/study.toml``, its ``[quick]`` overrides, validation.

Every study folder holds ``study.toml`` (what to train and evaluate, and the GPU budget), the
torchtitan recipe it names (``train_config``) and the model specs. ``--quick`` merges the
``[quick]`` table over the rest: the same runs, tiny enough for a CPU test.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hybridlm.errors import HybridLMError

STUDY_DIRS = (Path("specs/studies"), Path(__file__).resolve().parents[2] / "specs" / "studies")


class StudyError(HybridLMError):
    """A study that cannot run as configured (bad config, missing corpus, failed run)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainSettings(Strict):
    """What every run of a study passes to ``hybridlm train`` on top of the study's TOML recipe."""

    steps: int = Field(gt=0)
    local_batch_size: int = Field(gt=0)
    seq_len: int = Field(gt=0)
    lr: float | None = Field(default=None, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    log_freq: int = Field(default=10, gt=0)

    def flags(self, lr: float | None = None) -> list[str]:
        lr = self.lr if lr is None else lr
        flags = ["--training.steps", str(self.steps), "--training.local_batch_size", str(self.local_batch_size),
                 "--training.seq_len", str(self.seq_len), "--lr_scheduler.warmup_steps",
                 str(min(self.warmup_steps, max(self.steps - 1, 0))), "--metrics.log_freq", str(self.log_freq)]
        if lr is not None:
            flags += ["--optimizer.lr", f"{lr:g}"]
        return flags

    @property
    def tokens_per_step(self) -> int:
        return self.local_batch_size * self.seq_len


class ModelEntry(Strict):
    label: str
    spec: str  # a file in the study folder


class Estimate(Strict):
    """Planning figures for one H100 with ``jobs`` runs at a time: guesses until `--probe` measures them."""

    seconds_per_step: float = Field(gt=0)
    per_spec: dict[str, float] = Field(default_factory=dict)
    overhead_seconds: float = Field(default=30.0, ge=0)  # process start, kernel compilation, export, eval

    def run_seconds(self, spec: str, steps: int) -> float:
        return self.overhead_seconds + steps * self.per_spec.get(Path(spec).name, self.seconds_per_step)


class StudyConfig(Strict):
    """Fields every study has; each study subclasses it with its own."""

    title: str
    folder: Path  # set by the loader: where study.toml lives
    train_config: str
    seed: int = 0
    jobs: int = Field(default=1, gt=0)  # runs at a time on a GPU
    cpu_jobs: int = Field(default=1, gt=0)  # ... without one
    budget_minutes: float = Field(gt=0)  # the planned GPU wall time of the whole study (one H100)
    estimate: Estimate
    models: dict[str, Any]  # name -> the study's model entry (`--only` picks among these names)

    def path(self, name: str) -> Path:
        return self.folder / name

    def check_files(self, names: list[str]) -> None:
        missing = [n for n in [self.train_config, *names] if not self.path(n).is_file()]
        if missing:
            raise StudyError(f"{self.folder}: missing {', '.join(missing)}")


C = TypeVar("C", bound=StudyConfig)


def find_study_folder(name: str) -> Path:
    for root in STUDY_DIRS:
        if (root / name / "study.toml").is_file():
            return root / name
    raise StudyError(f"no specs/studies/{name}/study.toml (looked in {', '.join(str(d) for d in STUDY_DIRS)})")


def merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``, tables merged key by key (so [quick] changes only what it names)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(folder: Path, cls: type[C], *, quick: bool = False, overrides: dict[str, Any] | None = None) -> C:
    """Read ``folder/study.toml`` into ``cls``; ``quick`` merges its [quick] table, ``overrides`` go last."""
    path = folder / "study.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise StudyError(f"{path}: {err}") from None
    quick_table = raw.pop("quick", {})
    if quick:
        raw = merge(raw, quick_table)
    raw = merge(raw, overrides or {})
    try:
        config = cls.model_validate({**raw, "folder": folder})
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f"{'.' if i else ''}{part}" for i, part in enumerate(first["loc"]))
        message = first["msg"].removeprefix("Value error, ")
        shown = first.get("input")
        got = f" (got {shown!r})" if "input" in first and not isinstance(shown, dict) else ""
        raise StudyError(f"{path}: {where + ': ' if where else ''}{message}{got}") from None
    return config
