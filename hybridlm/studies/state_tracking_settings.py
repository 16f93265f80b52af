"""The settings of one run of the paper's state-tracking protocol, and their command-line flags.

The planner (:mod:`hybridlm.studies.state_tracking_paper`) writes a run as flags; the trainer
(:mod:`hybridlm.studies.state_tracking_train`) reads the same flags back into the same object, so
a test can check that every value of study.toml reaches the training loop. Flag names follow
``hybridlm train``'s where one exists (``--training.steps``, ``--optimizer.lr``, ...), which lets
the study driver's ``--probe`` shorten a run the same way for both protocols.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hybridlm.studies.config import Strict, StudyError

# field -> flag, in the order the flags are written
FLAGS = {
    "task": "--task",
    "spec": "--spec",
    "d_model": "--model.d_model",
    "layers": "--model.layers",
    "embedding_std": "--model.embedding_std",
    "seed": "--seed",
    "steps": "--training.steps",
    "solved_at": "--training.solved_at",
    "batch": "--training.local_batch_size",
    "max_norm": "--training.max_norm",
    "lr": "--optimizer.lr",
    "weight_decay": "--optimizer.weight_decay",
    "beta1": "--optimizer.beta1",
    "beta2": "--optimizer.beta2",
    "warmup_steps": "--lr_scheduler.warmup_steps",
    "min_lr_factor": "--lr_scheduler.min_lr_factor",
    "min_length": "--curriculum.min_length",
    "first_max": "--curriculum.first_max",
    "last_max": "--curriculum.last_max",
    "stages": "--curriculum.stages",
    "steps_per_stage": "--curriculum.steps_per_stage",
    "length_per": "--curriculum.length_per",
    "logits_over": "--loss.logits_over",
    "eval_lengths": "--eval.lengths",
    "report_length": "--eval.report_length",
    "eval_every": "--eval.every",
    "eval_samples": "--eval.samples",
    "diagnostics_every": "--diagnostics.every",
    "checkpoint_every": "--checkpoint.interval",
    "log_freq": "--metrics.log_freq",
    "compile": "--compile.mode",
}
# Settings that only decide how often a run is looked at (evaluated, diagnosed, logged, saved), not
# what it trains: left out of the run key, so a finer evaluation resumes runs instead of restarting them.
CADENCE_FIELDS = ("eval_every", "diagnostics_every", "checkpoint_every", "log_freq")
CADENCE_FLAGS = tuple(FLAGS[f] for f in CADENCE_FIELDS)
# How the training step's forward and loss run: eager, or torch.compile with dynamic lengths in one
# of its modes ("reduce-overhead" replays CUDA graphs: these tiny models wait on kernel launches),
# or "aot_eager" (dynamo and AOT autograd without code generation: a CPU check of the same trace);
# or "cuda-graph": no compiler, the whole step (forward, loss, backward, AdamW) captured in a CUDA
# graph per curriculum stage and replayed, every batch padded to its stage's longest example
# (lengths per example only; state_tracking_train.GraphedStep).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "aot_eager", "cuda-graph")


class RunSettings(Strict):
    """One run: the model (a spec file at a width and depth), the data, the optimizer, the evaluation."""

    task: str
    spec: str  # a spec file whose pattern is "(...) *N": the trainer sets d_model and N
    d_model: int = Field(gt=0)
    layers: int = Field(gt=0)
    # the token embedding's init std; 0 = the spec's init_std (Grazzi et al.'s harness: nn.Embedding's N(0, 1))
    embedding_std: float = Field(0.0, ge=0)
    seed: int = 0
    steps: int = Field(gt=0)
    solved_at: float = Field(0.0, ge=0, le=1)  # stop once the best scaled accuracy reaches this; 0 = never
    batch: int = Field(gt=0)  # examples a step
    max_norm: float = Field(0.0, ge=0)  # gradient clipping; 0 = none (Grazzi et al.)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    warmup_steps: int = Field(ge=0)
    min_lr_factor: float = Field(ge=0, le=1)  # cosine from lr to lr * this at the last step
    min_length: int = Field(gt=0)
    first_max: int = Field(gt=0)
    last_max: int = Field(gt=0)
    stages: int = Field(gt=0)
    steps_per_stage: int = Field(gt=0)
    # "example": each example of a step draws its length, rows right-padded (Grazzi et al.'s harness);
    # "batch": one length a step (Deletang et al.)
    length_per: Literal["example", "batch"] = "batch"
    # the answer's softmax: over the whole byte vocabulary, or over the task's answers only (what
    # Grazzi et al.'s 3-token vocabulary amounts to; results.md §1 measured why it matters)
    logits_over: Literal["vocab", "answers"] = "vocab"
    eval_lengths: list[int] = Field(min_length=1)
    report_length: int = Field(gt=0)
    eval_every: int = Field(gt=0)
    eval_samples: int = Field(gt=0)
    diagnostics_every: int = Field(0, ge=0)  # 0 = no diagnostics; a multiple of eval_every (taken at evaluations)
    checkpoint_every: int = Field(1000, gt=0)  # checkpoint.pt, progress.json and a log line
    log_freq: int = Field(gt=0)
    compile: str = "none"  # COMPILE_MODES

    @model_validator(mode="after")
    def _consistent(self) -> "RunSettings":
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile.mode {self.compile!r}: choose one of {', '.join(COMPILE_MODES)}")
        if self.compile == "cuda-graph" and (self.length_per != "example" or self.max_norm > 0):
            raise ValueError("compile.mode 'cuda-graph' pads each step to its stage's longest example: it needs "
                             "curriculum.length_per 'example' (one length a step would need a graph a length) "
                             "and no gradient clipping (max_norm 0)")
        if self.diagnostics_every % self.eval_every:
            raise ValueError(f"diagnostics.every {self.diagnostics_every} must be a multiple of eval.every "
                             f"{self.eval_every}: diagnostics are taken at evaluations")
        if self.report_length not in self.eval_lengths:
            raise ValueError(f"eval.report_length {self.report_length} is not one of eval.lengths {self.eval_lengths}")
        if not self.min_length <= self.first_max <= self.last_max:
            raise ValueError(f"curriculum lengths must grow: min_length {self.min_length} <= first_max "
                             f"{self.first_max} <= last_max {self.last_max}")
        return self

    def to_flags(self) -> list[str]:
        out: list[str] = []
        for field, flag in FLAGS.items():
            value = getattr(self, field)
            out += [flag, ",".join(map(str, value)) if isinstance(value, list) else repr(value)
                    if isinstance(value, float) else str(value)]
        return out

    @classmethod
    def from_flags(cls, flags: list[str]) -> "RunSettings":
        """The inverse of :meth:`to_flags`; a flag given twice keeps its last value (as argparse)."""
        by_flag = {flag: field for field, flag in FLAGS.items()}
        raw: dict[str, object] = {}
        it = iter(flags)
        for flag in it:
            if flag not in by_flag:
                raise StudyError(f"unknown flag {flag} (known: {', '.join(FLAGS.values())})")
            value = next(it, None)
            if value is None:
                raise StudyError(f"flag {flag} has no value")
            field = by_flag[flag]
            raw[field] = [int(v) for v in value.split(",") if v] if field == "eval_lengths" else value
        missing = [FLAGS[f] for f, info in cls.model_fields.items() if info.is_required() and f not in raw]
        if missing:
            raise StudyError(f"missing flag(s) {', '.join(missing)}")
        try:
            return cls.model_validate(raw)
        except ValueError as err:
            raise StudyError(f"bad run settings: {err}") from None
