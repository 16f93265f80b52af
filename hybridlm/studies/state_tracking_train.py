"""One run of the paper's state-tracking protocol: a plain PyTorch loop (docs/results.md §1).

    python -m hybridlm.studies.state_tracking_train --out WORK FLAGS...   (FLAGS: state_tracking_settings.FLAGS)

The study (``hybridlm study state-tracking --set protocol=paper``) starts one such process per run,
several side by side. What a run does:

* **Data.** Every step is ``batch`` examples with lengths drawn from the curriculum (min 3, max
  40 -> 160 in ``stages`` stages of ``steps_per_stage``): each example its own length, rows
  right-padded (``length_per = "example"``, Grazzi et al.'s harness), or one length for the step
  (``"batch"``, Deletang et al.). Step s's batch depends only on (seed, s): a run resumes anywhere.
  The loss is the cross-entropy of the answer after '=' (the byte vocabulary, as the harness scores).
* **Step.** Forward and loss eager, or through ``torch.compile`` (``compile`` in the settings;
  ``reduce-overhead`` replays CUDA graphs, as these tiny models wait on kernel launches), or the
  whole step with the update captured in a CUDA graph per stage (``cuda-graph``: :class:`GraphedStep`).
* **Optimizer.** AdamW (betas, weight decay from the settings; the block kinds' no-decay
  parameters, norms and biases never decay), linear warm-up then cosine to ``lr * min_lr_factor``,
  clipping only when ``max_norm`` > 0. fp32.
* **Evaluation.** Every ``eval_every`` steps (and at the end), accuracy on ``eval_samples``
  held-out harness examples at each of ``eval_lengths``; the best scaled accuracy at
  ``report_length`` is kept with its step and its weights (``best.pt``), as the paper reports the best.
  Often (the paper protocol: every 100 steps): a run can solve the task and lose it again within a
  few hundred steps (docs/results.md §1).
* **Diagnostics** every ``diagnostics_every`` steps (state_tracking_diagnostics.py).
* **Stopping and resuming.** Every ``checkpoint_every`` steps, and when ``--time-limit S`` (or
  ``--stop-after-steps N``) stops the loop, the trainer writes ``checkpoint.pt`` (weights, optimizer,
  step, history) and ``progress.json`` (status ``paused`` at a stop); the same command again
  resumes from the checkpoint when its ``--run-key`` matches, and starts over when it does not. A finished run
  writes ``result.json`` (status ``done``) and ``last.pt`` (its last weights, without the optimizer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hybridlm.eval.tasks import LengthCurriculum, example_rng, make_task
from hybridlm.studies.official_control import autotune_turn, pin_official_choices, uses_official
from hybridlm.studies.state_tracking_settings import RunSettings
from hybridlm.tokenizer import ByteTokenizer

DIAGNOSTIC_EXAMPLES, DIAGNOSTIC_LENGTH = 64, 64
WARM_UP_LENGTH = 64  # symbols of the warm-up batch (the official kernels' autotune keys hold no length)
WARM_STEPS = 20  # a slice's steady steps/s is measured after these (the first compile the kernels)


# -- pieces (each testable on its own) ---------------------------------------------------------------
def curriculum(s: RunSettings) -> LengthCurriculum:
    return LengthCurriculum(min_length=s.min_length, first_max=s.first_max, last_max=s.last_max, stages=s.stages,
                            steps_per_stage=s.steps_per_stage)


def lr_at(s: RunSettings, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``warmup_steps``, then cosine
    from ``lr`` to ``lr * min_lr_factor`` at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(s.steps - 1 - s.warmup_steps, 1)
    progress = min((step - s.warmup_steps) / span, 1.0)
    return s.lr * (s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Batch(NamedTuple):
    """A step's examples: ``ids`` (batch, width) up to and including each '=', right-padded with
    PAD_ID; ``answers`` (batch,); ``ends`` (batch,), each row's '=' position (the answer is read there)."""

    ids: torch.Tensor
    answers: torch.Tensor
    ends: torch.Tensor


PAD_ID = 0  # after '=': the models are causal, so nothing after the answer position reaches it


class Batches:
    """Step -> :class:`Batch` on the CPU. ``length_per = "batch"``: one length for the step's
    examples (Deletang et al.); ``"example"``: each example draws its own length and rows are
    right-padded (Grazzi et al.'s harness), so every step holds short examples."""

    def __init__(self, s: RunSettings):
        self.s = s
        self.task = make_task(s.task, ByteTokenizer())
        self.curriculum = curriculum(s)

    def length(self, step: int) -> int:
        return self.curriculum.sample_length(step, example_rng(self.s.seed, "paper-length", step))

    def lengths(self, step: int) -> torch.Tensor:
        """The step's example lengths (batch,)."""
        if self.s.length_per == "batch":
            return torch.full((self.s.batch,), self.length(step))
        gen = torch.Generator().manual_seed(example_rng(self.s.seed, "paper-lengths", step).getrandbits(63))
        top = self.curriculum.max_length(step)
        return torch.randint(self.curriculum.min_length, top + 1, (self.s.batch,), generator=gen)

    def __call__(self, step: int, padded: bool = False) -> Batch:
        """Step ``step``'s batch; ``padded``: right-padded to its stage's longest example (the same
        examples; one shape a stage, as a CUDA graph needs)."""
        lengths = self.lengths(step)
        width = self.curriculum.max_length(step) if padded else int(lengths.max())
        rows = torch.arange(self.s.batch)
        if self.s.task == "parity":  # one tensor draw: building 256 examples in Python would dominate a step
            gen = torch.Generator().manual_seed(example_rng(self.s.seed, "paper-bits", step).getrandbits(63))
            bits = torch.randint(0, 2, (self.s.batch, width), generator=gen)
            inside = torch.arange(width) < lengths[:, None]
            bits = bits * inside
            token = self.task.token
            ids = torch.where(inside, torch.where(bits.bool(), token["1"], token["0"]), PAD_ID)
            ids = torch.cat([ids, torch.full((self.s.batch, 1), PAD_ID)], 1)
            ids[rows, lengths] = token["="]
            answers = torch.where(bits.sum(1) % 2 == 1, token["1"], token["0"])
            return Batch(ids, answers, lengths)
        rng = example_rng(self.s.seed, "paper-examples", step)
        examples = [self.task.example(int(n), rng, i, self.s.batch).ids for i, n in enumerate(lengths.tolist())]
        wide = max(map(len, examples)) - 1  # up to '='; the answer is the label
        if padded:
            wide = max(wide, self.curriculum.max_length(step) + 1)
        ids = torch.tensor([e[:-1] + [PAD_ID] * (wide - len(e) + 1) for e in examples])
        return Batch(ids, torch.tensor([e[-1] for e in examples]), torch.tensor([len(e) - 2 for e in examples]))

    def held_out(self, length: int, n: int) -> Batch:
        """The harness's own evaluation examples (``hybridlm eval --seed``) at ``length``."""
        full = torch.tensor([e.ids for e in self.task.examples(length, n, seed=self.s.seed)])
        return Batch(full[:, :-1], full[:, -1], torch.full((n,), full.shape[1] - 2))


def build_model(s: RunSettings, device: str | torch.device):
    """The spec file at width ``d_model`` with its pattern's group repeated ``layers`` times, fp32."""
    import yaml

    from hybridlm import ModelSpec
    from hybridlm import build_model as build
    from hybridlm.studies.official_control import register

    register()  # the control's block kind, which only this study knows
    raw = yaml.safe_load(Path(s.spec).read_text())
    match = re.fullmatch(r"\s*\((.+)\)\s*\*\s*\d+\s*", str(raw.get("pattern", "")))
    if match is None:
        raise ValueError(f"{s.spec}: pattern {raw.get('pattern')!r} must be '(...) *N' so the study can set the depth")
    raw.update(d_model=s.d_model, pattern=f"({match.group(1)}) *{s.layers}")
    model = build(ModelSpec.model_validate(raw), seed=s.seed)
    if s.embedding_std:  # redrawn from the seed alone, so every model kind of one run gets the same table
        with torch.no_grad():
            model.tok_embeddings.weight.normal_(0.0, s.embedding_std,
                                                generator=torch.Generator().manual_seed(s.seed))
    return model.to(device=device, dtype=torch.float32)


def decay_groups(model, weight_decay: float) -> list[dict]:
    """``hybridlm train``'s two AdamW groups (hybridlm/titan/optim.py, param_groups): decay on matmul
    weights and the embedding; none on norms, biases, vectors and each block kind's ``no_decay``
    names. Written out here because importing hybridlm.titan loads torchtitan, seconds of start-up
    for every run process; a test holds the two equal."""
    from hybridlm.builder.model.registry import block_kind

    exempt = {id(p): frozenset(block_kind(resolved.spec.kind).no_decay)
              for layer, resolved in zip(model.layers, model.spec.resolve()) for p in layer.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        keep = leaf in exempt.get(id(p), ()) or leaf == "bias" or p.ndim < 2 or "norm" in name.lower()
        (no_decay if keep else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, s: RunSettings) -> torch.optim.Optimizer:
    # fused on a GPU: one kernel launch for the update, where these tiny models wait on launches
    device = next(model.parameters()).device
    if s.compile == "cuda-graph":  # the update inside the graph: capturable, the lr a device tensor it reads
        return torch.optim.AdamW(decay_groups(model, s.weight_decay), lr=torch.tensor(lr_at(s, 0), device=device),
                                 betas=(s.beta1, s.beta2), fused=True, capturable=True)
    return torch.optim.AdamW(decay_groups(model, s.weight_decay), lr=lr_at(s, 0), betas=(s.beta1, s.beta2),
                             fused=device.type == "cuda" or None)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # in place: a captured update reads this tensor
        else:
            group["lr"] = lr


class GraphedStep:
    """The whole training step (forward, loss, backward, AdamW update) as a CUDA graph, captured
    once per batch shape (one a curriculum stage: batches padded to the stage's longest example) and
    replayed: these one-layer models spend an eager step waiting on ~a hundred kernel launches.

    Capture needs a few warm-up steps first (allocations, autotuning, the optimizer's state); they
    run on the stage's first batch and are then undone in place (weights and optimizer state back to
    what they were, in the storages the graph records), so the run's trajectory is the eager one's."""

    WARM_UP = 3

    def __init__(self, model, opt: torch.optim.Optimizer, loss):
        self.model, self.opt, self.loss = model, opt, loss
        self.width: int | None = None
        self.graph = self.inputs = self.static_loss = None

    def __call__(self, batch: Batch) -> torch.Tensor:
        if batch.ids.shape[1] != self.width:
            self.capture(batch)
        for static, value in zip(self.inputs, batch):
            static.copy_(value)
        self.graph.replay()
        return self.static_loss

    def capture(self, batch: Batch) -> None:
        model, opt = self.model, self.opt
        self.graph = self.static_loss = None  # the previous stage's graph and its memory go
        device = batch.ids.device
        for group in opt.param_groups:  # a float lr would be baked into the graph (say, after a resume)
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        params = [p.detach().clone() for p in model.parameters()]
        states = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in opt.state.items()}
        self.inputs = [t.clone() for t in batch]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARM_UP):
                opt.zero_grad(set_to_none=True)
                self.loss(*self.inputs).backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # undo the warm-up in place
            for p, before in zip(model.parameters(), params):
                p.copy_(before)
            for p, st in opt.state.items():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        v.copy_(states[p][k]) if p in states else v.zero_()  # a fresh state: all zeros, step 0
        self.graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.static_loss = self.loss(*self.inputs)
            self.static_loss.backward()
            opt.step()
        self.width = batch.ids.shape[1]


def answer_logits(model, ids: torch.Tensor, ends: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """The logits at each row's '=' (``ends``): the answer's prediction; over the token ids
    ``classes`` only (in their order) when given, else over the whole vocabulary."""
    features = model.features(ids)[torch.arange(len(ids), device=ids.device), ends]
    if classes is None:
        return model.output(features).float()
    return F.linear(features, model.output.weight[classes]).float()


class AnswerClasses:
    """``logits_over = "answers"``: the softmax over the task's answer tokens only, so the loss and
    the guess never see the other 250-odd bytes. Answers stay token ids everywhere else; ``target``
    maps them to class indices (a table lookup, so a captured CUDA graph can replay it)."""

    def __init__(self, answer_ids: list[int], vocab_size: int, device: torch.device):
        self.ids = torch.tensor(answer_ids, device=device)
        self.index = torch.full((vocab_size,), -100, dtype=torch.long, device=device)  # -100: cross_entropy's ignore
        self.index[self.ids] = torch.arange(len(answer_ids), device=device)

    def target(self, answers: torch.Tensor) -> torch.Tensor:
        return self.index[answers]


def training_loss(model, mode: str, classes: AnswerClasses | None = None):
    """(ids, answers, ends) -> the step's loss, eager or compiled. Lengths change every step, so the
    compile is dynamic: one trace serves every length up to the scan's chunk, and each further
    chunk count adds one (3 for lengths up to 160; measured on the CPU)."""
    def loss(ids: torch.Tensor, answers: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        if classes is None:
            return F.cross_entropy(answer_logits(model, ids, ends), answers)
        return F.cross_entropy(answer_logits(model, ids, ends, classes.ids), classes.target(answers))

    if mode == "none":
        return loss
    if mode == "aot_eager":
        return torch.compile(loss, backend="aot_eager", dynamic=True)
    return torch.compile(loss, mode=mode, dynamic=True)


@torch.no_grad()
def accuracy(model, examples: Batch, batch: int = 512, classes: AnswerClasses | None = None) -> float:
    model.eval()
    ids, answers, ends = examples
    right = 0
    for i in range(0, len(ids), batch):
        guess = answer_logits(model, ids[i:i + batch], ends[i:i + batch], None if classes is None else classes.ids)
        guess = guess.argmax(-1) if classes is None else classes.ids[guess.argmax(-1)]
        right += int((guess == answers[i:i + batch]).sum())
    model.train()
    return right / len(ids)


# -- the loop ----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, s: RunSettings, out: Path, run_key: str = "", device: str | None = None):
        self.s, self.out, self.key = s, out, run_key
        out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batches = Batches(s)
        self.chance = self.batches.task.chance()
        if s.compile == "cuda-graph" and self.device.type != "cuda":
            raise ValueError(f"compile.mode 'cuda-graph' captures the step in a CUDA graph: it needs a CUDA device, "
                             f"not {self.device}")
        self.model = build_model(s, self.device)
        self.opt = build_optimizer(self.model, s)
        graphed = s.compile == "cuda-graph"
        task = self.batches.task
        self.classes = (AnswerClasses([task.token[a] for a in task.answers], self.model.output.out_features, self.device)
                        if s.logits_over == "answers" else None)
        self.loss = training_loss(self.model, "none" if graphed else s.compile, self.classes)
        self.graphed = GraphedStep(self.model, self.opt, self.loss) if graphed else None
        self.step = 0
        self.losses: list[list[float]] = []  # [step, mean loss over the logged interval]
        self.history: list[dict] = []  # one entry per evaluation
        self.best: dict | None = None
        self.slices: list[dict] = []
        self.loss_sum, self.loss_count = 0.0, 0  # the logging interval in progress (kept across a pause)
        self.held_out = {n: Batch(*(t.to(self.device) for t in self.batches.held_out(n, s.eval_samples)))
                         for n in s.eval_lengths}
        token = self.batches.task.token
        self.one_id, self.zero_id = token.get("1"), token.get("0")

    # checkpoints
    def _save(self, name: str, payload: dict) -> None:
        tmp = self.out / f"{name}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.out / name)  # a stopped process never leaves half a checkpoint

    def save_checkpoint(self) -> None:
        self._save("checkpoint.pt", {"key": self.key, "step": self.step, "model": self.model.state_dict(),
                                     "opt": self.opt.state_dict(), "losses": self.losses, "history": self.history,
                                     "best": self.best, "slices": self.slices,
                                     "loss_interval": [self.loss_sum, self.loss_count]})

    def resume(self) -> str:
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            return "no checkpoint: starting at step 0"
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("key") != self.key:
            return f"checkpoint of another run key ({state.get('key')}): starting over at step 0"
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.losses, self.history = state["step"], state["losses"], state["history"]
        self.best, self.slices = state["best"], state["slices"]
        self.loss_sum, self.loss_count = state["loss_interval"]
        return f"resumed from the checkpoint at step {self.step}"

    # evaluation
    def evaluate(self) -> dict:
        entry: dict = {"step": self.step, "lr": lr_at(self.s, max(self.step - 1, 0)),
                       "max_length": self.batches.curriculum.max_length(max(self.step - 1, 0))}
        for n, examples in self.held_out.items():
            acc = accuracy(self.model, examples, classes=self.classes)
            entry[f"accuracy@{n}"] = acc
            entry[f"scaled_accuracy@{n}"] = (acc - self.chance) / (1 - self.chance)
        if self.s.diagnostics_every and self.step % self.s.diagnostics_every == 0:
            entry["diagnostics"] = self.diagnostics()
        self.history.append(entry)
        report = entry[f"scaled_accuracy@{self.s.report_length}"]
        if self.best is None or report > self.best["scaled_accuracy"]:
            self.best = {"step": self.step, "scaled_accuracy": report,
                         "cells": {n: entry[f"accuracy@{n}"] for n in self.s.eval_lengths}}
            self._save("best.pt", {"step": self.step, "model": self.model.state_dict()})
        return entry

    def solved(self) -> bool:
        """The best held-out accuracy reached ``solved_at`` (scaled): training on cannot raise the
        number the paper reports, so the run ends there (0 = never)."""
        return bool(self.s.solved_at) and self.best is not None and self.best["scaled_accuracy"] >= self.s.solved_at

    def diagnostics(self) -> list[dict]:
        from hybridlm.studies.state_tracking_diagnostics import measure

        ids = self.batches.held_out(DIAGNOSTIC_LENGTH, DIAGNOSTIC_EXAMPLES).ids
        return measure(self.model, ids.to(self.device), self.one_id, self.zero_id)

    # training
    def warm_up(self) -> None:
        """One forward and backward of a short batch, gradients dropped: every kernel compiled and
        autotuned, the weights, optimizer and data stream untouched."""
        self.loss(*(t.to(self.device) for t in self.batches.held_out(WARM_UP_LENGTH, 2))).backward()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train(self, time_limit: float | None = None, stop_after_steps: int | None = None,
              log=print) -> str:
        """Train until the end, the time limit (seconds) or ``stop_after_steps`` more steps; returns
        the status written to progress.json: ``done`` or ``paused``."""
        s, model, opt = self.s, self.model, self.opt
        started, first = time.monotonic(), self.step
        last_stop = s.steps if stop_after_steps is None else min(s.steps, self.step + stop_after_steps)
        running = torch.full((), self.loss_sum, device=self.device, dtype=torch.float64)

        def out_of_time() -> bool:
            return time_limit is not None and time.monotonic() - started > time_limit

        model.train()
        if uses_official(model) and self.device.type == "cuda":
            pinned = pin_official_choices(torch.cuda.get_device_name(self.device))
            if pinned:
                log(f"pinned {pinned} autotune choices of the official kernels for this GPU")
            with autotune_turn(self.out.parent, time_limit) as turn:
                if turn:
                    self.warm_up()
        if self.step == 0 and not self.history and not out_of_time():
            self.evaluate()  # the init's accuracy: step 0 of every curve
        warm = None  # (step, time) once WARM_STEPS steps of this slice ran: kernel compilation is behind
        while self.step < last_stop and not self.solved():
            if out_of_time():
                break
            if warm is None and self.step - first == WARM_STEPS:
                warm = (self.step, time.monotonic())
            padded = self.graphed is not None
            batch = Batch(*(t.to(self.device, non_blocking=True) for t in self.batches(self.step, padded)))
            if self.graphed is not None:  # the step's update reads the lr tensor: set it first
                set_lr(opt, lr_at(s, self.step))
                running += self.graphed(batch)
            else:
                torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: a new step (no-op otherwise)
                loss = self.loss(*batch)
                running += loss.detach()  # before the backward: a replayed graph's output is its own memory
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if s.max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_norm)
                set_lr(opt, lr_at(s, self.step))
                opt.step()
            self.step += 1
            self.loss_count += 1
            if self.step % s.log_freq == 0 or self.step == s.steps:
                self.losses.append([self.step, running.item() / self.loss_count])
                running.zero_()
                self.loss_count = 0
            if self.step % s.eval_every == 0 or self.step == s.steps:
                self.evaluate()
            if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                entry = self.history[-1]
                log(f"step {self.step}/{s.steps} loss {self.losses[-1][1] if self.losses else float('nan'):.4f} "
                    f"scaled acc@{s.report_length} {entry[f'scaled_accuracy@{s.report_length}']:.3f} "
                    f"(best {self.best['scaled_accuracy']:.3f} at {self.best['step']})")
                self.loss_sum = running.item()
                self.save_checkpoint()
                self.write_progress("running")
        self.loss_sum = running.item()  # also waits for the device: the slice's seconds are its own
        seconds = time.monotonic() - started
        done = self.step >= s.steps or self.solved()
        steady = None
        if warm is not None and self.step > warm[0]:
            steady = round((self.step - warm[0]) / (started + seconds - warm[1]), 3)
        self.slices.append({"from": first, "to": self.step, "seconds": round(seconds, 2),
                            "steps_per_second": round((self.step - first) / seconds, 3) if seconds > 0 else None,
                            "steady_steps_per_second": steady,
                            "jobs": int(os.environ.get("HYBRIDLM_STUDY_JOBS", "1"))})
        self.save_checkpoint()
        status = "done" if done else "paused"
        self.write_progress(status)
        if done:  # the last weights outlive checkpoint.pt (the runner drops it): length profiles of the end
            self._save("last.pt", {"step": self.step, "model": self.model.state_dict()})
            (self.out / "result.json").write_text(json.dumps(self.result(), indent=1) + "\n")
        return status

    def write_progress(self, status: str) -> None:
        tmp = self.out / "progress.json.tmp"
        tmp.write_text(json.dumps({"status": status, "key": self.key, "step": self.step, "steps": self.s.steps,
                                   "best": self.best, "slices": self.slices, "losses": self.losses,
                                   "history": self.history}) + "\n")
        os.replace(tmp, self.out / "progress.json")

    def result(self) -> dict:
        seconds = sum(sl["seconds"] for sl in self.slices)
        last = self.slices[-1]
        cells = [{"task": self.s.task, "length": n, "accuracy": acc, "chance": self.chance,
                  "scaled_accuracy": (acc - self.chance) / (1 - self.chance), "examples": self.s.eval_samples,
                  "step": self.best["step"]} for n, acc in self.best["cells"].items()]
        return {"train": {"steps": self.step, "solved": self.solved(), "tokens_per_step": self.s.batch,
                          "seconds": round(seconds, 1),
                          "seconds_per_step": round(seconds / self.step, 6) if self.step else None,
                          "tokens_per_second": (last["steps_per_second"] or 0) * self.s.batch,
                          "final_loss": self.losses[-1][1] if self.losses else None, "losses": self.losses,
                          "slices": self.slices},
                "eval": cells, "best": self.best, "history": self.history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="the run's folder (checkpoint, progress, result)")
    parser.add_argument("--run-key", default="", help="resume only a checkpoint written under this key")
    parser.add_argument("--time-limit", type=float, default=None, help="stop (and checkpoint) after this many seconds")
    parser.add_argument("--stop-at", type=float, default=None,
                        help="stop (and checkpoint) at this Unix time: start-up and compilation count too")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="stop (and checkpoint) after this many steps")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args, flags = parser.parse_known_args(argv)
    settings = RunSettings.from_flags(flags)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[state-tracking] {message}", flush=True)

    trainer = Trainer(settings, args.out, args.run_key, args.device)
    log(f"{settings.task}, d_model {settings.d_model}, {settings.layers} layer(s), lr {settings.lr:g}, "
        f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters on {trainer.device}; {trainer.resume()}")
    left = None if args.stop_at is None else args.stop_at - time.time()
    limits = [t for t in (args.time_limit, left) if t is not None]
    status = trainer.train(min(limits, default=None), args.stop_after_steps, log)
    last = trainer.slices[-1]
    log(f"{status}: step {trainer.step}/{settings.steps}, {last['to'] - last['from']} steps in {last['seconds']:.0f} s"
        f" ({last['steps_per_second']} steps/s; {last['steady_steps_per_second']} after the first {WARM_STEPS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
