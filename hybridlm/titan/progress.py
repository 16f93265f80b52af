"""What `hybridlm train` shows a person (``--hybrid.log compact``, the default).

torchtitan logs one line per logged step with fields a CPU cannot measure (memory, TFLOPs, MFU) and
no sense of how far the run is. :class:`ProgressFormatter` rewrites its lines:

    [hybridlm] tiny-hybrid: 1,871,168 parameters, 50 steps on cpu; checkpoints every 25 steps and at the end to runs/x/checkpoint
    [hybridlm] step  10/50   20%  loss 3.2140  grad_norm 1.95  11,234 tok/s  elapsed 0:12  ETA 0:48
    [hybridlm] done: 50 steps in 1:02; checkpoints in runs/x/checkpoint; next: hybridlm export runs/x --out models/tiny-hybrid

On a GPU the step line adds memory and MFU. ``--hybrid.log torchtitan`` keeps torchtitan's own lines.

On a terminal the step lines are one progress bar, redrawn in place (``HYBRIDLM_PROGRESS=lines`` keeps
a line per logged step; ``=bar`` draws the bar without a terminal too):

    [hybridlm] hybrid-demo  [##########..........]  300/600   50%  loss 0.4120  12,345 tok/s  elapsed 1:02  ETA 1:01
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"^step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)(?:\s+grad_norm:\s*(?P<grad>\S+))?"
                   r"(?:.*?memory:\s*(?P<mem>-?[\d.]+)GiB)?(?:.*?tps:\s*(?P<tps>[\d,]+))?"
                   r"(?:.*?mfu:\s*(?P<mfu>[\d.]+)%)?")
_UP_AND_CLEAR = "\x1b[1A\x1b[2K\r"  # cursor to the previous line, erase it: the bar is redrawn in place
_BAR_WIDTH = 20
_SIZE = re.compile(r"^Model \S+ \S+ size: ([\d,]+) total parameters")
# A logged step in any form, torchtitan's ("step: 20  loss: 3.214 ... tps: 11,234") or ours
# ("step  20/100  20%  loss 3.214 ... 11,234 tok/s", or the bar's "[####....]  20/100  20%  loss 3.214 ..."):
# for the tools that read training logs.
STEP_LINE = re.compile(r"(?:step:?\s*|\]\s+)(?P<step>\d+)(?:/\d+)?\s+(?:\d+%\s+)?loss:?\s*(?P<loss>[-+0-9.eE]+|nan|inf)"
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

    def __init__(self, facts: RunFacts, prefix: str = "[hybridlm] ", clock=time.monotonic, bar: bool | None = None):
        super().__init__(f"{prefix}%(message)s")
        self.facts, self.prefix, self.clock = facts, prefix, clock
        self.started: float | None = None  # when training started
        self.first_step: tuple[int, float] | None = None  # (step, time) of the first step line
        self.bar = use_bar() if bar is None else bar  # step lines as one bar redrawn in place
        self.bar_shown = False  # the last line written is the bar (the next step line replaces it)

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        rewritten = self.rewrite(message)
        is_step = rewritten is not None and bool(_STEP.match(_ANSI.sub("", message).strip()))
        text = self.prefix + rewritten if rewritten is not None else super().format(record)
        if self.bar and is_step:
            text = (_UP_AND_CLEAR if self.bar_shown else "") + text
        self.bar_shown = self.bar and is_step
        return text

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
        if self.bar:  # "hybrid-demo  [#####...............]  150/600   25%  loss ..."
            filled = min(_BAR_WIDTH, _BAR_WIDTH * step // max(total, 1))
            parts[0] = (f"{self.facts.spec_name}  [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]  "
                        f"{step:>{len(str(total))}d}/{total}")
        if m.group("grad") and not self.bar:
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


def use_bar() -> bool:
    """Draw the step lines as one bar: on a terminal, unless HYBRIDLM_PROGRESS says ``lines`` (or ``bar``)."""
    choice = os.environ.get("HYBRIDLM_PROGRESS", "").strip().lower()
    if choice in ("bar", "lines"):
        return choice == "bar"
    try:
        return sys.stdout.isatty()  # torchtitan's log handler writes to stdout
    except (AttributeError, ValueError):
        return False
