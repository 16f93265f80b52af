"""What `hybridlm train` shows a person (``--hybrid.log compact``, the default).

torchtitan logs one line per logged step with fields a CPU cannot measure (memory, TFLOPs, MFU) and
no sense of how far the run is. :class:`ProgressFormatter` rewrites its lines:

    [hybridlm] tiny-hybrid: 1,871,168 parameters, 50 steps on cpu; checkpoints every 25 steps and at the end to runs/x/checkpoint
    [hybridlm] step  10/50   20%  loss 3.2140  grad_norm 1.95  11,234 tok/s  elapsed 0:12  ETA 0:48
    [hybridlm] done: 50 steps in 1:02; checkpoints in runs/x/checkpoint; next: hybridlm export runs/x --out models/tiny-hybrid

On a GPU the step line adds memory and MFU. ``--hybrid.log torchtitan`` keeps torchtitan's own lines.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"^step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)(?:\s+grad_norm:\s*(?P<grad>\S+))?"
                   r"(?:.*?memory:\s*(?P<mem>-?[\d.]+)GiB)?(?:.*?tps:\s*(?P<tps>[\d,]+))?"
                   r"(?:.*?mfu:\s*(?P<mfu>[\d.]+)%)?")
_SIZE = re.compile(r"^Model \S+ \S+ size: ([\d,]+) total parameters")
# A logged step in either form, torchtitan's ("step: 20  loss: 3.214 ... tps: 11,234") or ours
# ("step  20/100  20%  loss 3.214 ... 11,234 tok/s"): for the tools that read training logs.
STEP_LINE = re.compile(r"step:?\s*(?P<step>\d+)(?:/\d+)?\s+(?:\d+%\s+)?loss:?\s*(?P<loss>[-+0-9.eE]+|nan|inf)"
                       r"(?:.*?(?:tps:\s*(?P<tps>[\d,]+)|(?P<rate>[\d,]+) tok/s))?")


def parse_step_line(match: re.Match) -> tuple[int, float, float | None]:
    """(step, loss, tokens/s or None) of a :data:`STEP_LINE` match."""
    tps = match.group("tps") or match.group("rate")
    return int(match.group("step")), float(match.group("loss")), None if tps is None else float(tps.replace(",", ""))


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class RunFacts:
    """What the messages say about the run, read from the parsed torchtitan config."""

    spec_name: str
    total_steps: int
    device: str  # "cpu" or "cuda"
    dump_folder: str
    checkpoint_folder: str | None  # None: checkpoints are off
    checkpoint_interval: int

    @classmethod
    def from_config(cls, config, spec_name: str, device: str) -> "RunFacts":
        checkpoint = config.checkpoint
        folder = str(Path(config.job.dump_folder) / checkpoint.folder) if checkpoint.enable else None
        return cls(spec_name, config.training.steps, device, config.job.dump_folder, folder, checkpoint.interval)


class ProgressFormatter(logging.Formatter):
    """Formats torchtitan's compact log for people; lines it does not know pass unchanged."""

    def __init__(self, facts: RunFacts, prefix: str = "[hybridlm] ", clock=time.monotonic):
        super().__init__(f"{prefix}%(message)s")
        self.facts, self.prefix, self.clock = facts, prefix, clock
        self.started: float | None = None  # when training started
        self.first_step: tuple[int, float] | None = None  # (step, time) of the first step line

    def format(self, record: logging.LogRecord) -> str:
        rewritten = self.rewrite(record.getMessage())
        return self.prefix + rewritten if rewritten is not None else super().format(record)

    def rewrite(self, message: str) -> str | None:
        """The person-facing text of one torchtitan message (None: keep it as it is)."""
        message = _ANSI.sub("", message).strip()
        if (m := _SIZE.match(message)):
            return self._header(m.group(1))
        if message.startswith("Training starts at step"):
            self.started = self.clock()
            return None
        if (m := _STEP.match(message)):
            return self._step(m)
        if message.startswith("Training completed"):
            return self._done()
        return None

    def _header(self, params: str) -> str:
        f = self.facts
        every = f"every {f.checkpoint_interval} steps and " if f.checkpoint_interval < f.total_steps else ""
        where = f"checkpoints {every}at the end to {f.checkpoint_folder}" if f.checkpoint_folder else "checkpoints off"
        return f"{f.spec_name}: {params} parameters, {f.total_steps} steps on {f.device}; {where}"

    def _step(self, m: re.Match) -> str:
        step, now = int(m.group("step")), self.clock()
        if self.first_step is None:
            self.first_step = (step, now)
        total = self.facts.total_steps
        parts = [f"step {step:>{len(str(total))}d}/{total}", f"{100 * step // max(total, 1):3d}%",
                 f"loss {m.group('loss')}"]
        if m.group("grad"):
            parts.append(f"grad_norm {m.group('grad')}")
        if m.group("tps"):
            parts.append(f"{m.group('tps')} tok/s")
        if self.facts.device != "cpu":  # fields a CPU cannot measure are left out there
            if m.group("mem") and float(m.group("mem")) > 0:
                parts.append(f"mem {float(m.group('mem')):.1f} GiB")
            if m.group("mfu"):
                parts.append(f"MFU {float(m.group('mfu')):.1f}%")
        if self.started is not None:
            parts.append(f"elapsed {_clock(now - self.started)}")
        first, at = self.first_step
        if step > first and step < total:  # the first step pays start-up and compilation: time from it on
            parts.append(f"ETA {_clock((now - at) / (step - first) * (total - step))}")
        return "  ".join(parts)

    def _done(self) -> str:
        f = self.facts
        took = f" in {_clock(self.clock() - self.started)}" if self.started is not None else ""
        text = f"done: {f.total_steps} steps{took}"  # torchtitan completes at the last step, logged or not
        if f.checkpoint_folder:
            name = re.sub(r"[^\w.-]+", "-", f.spec_name) or "model"
            return (f"{text}; checkpoints in {f.checkpoint_folder}; next: "
                    f"hybridlm export {f.dump_folder} --out models/{name}")
        return f"{text}; no checkpoints were written (checkpoints are off: --checkpoint.enable to keep them)"
