"""A hand-set parity solution for the state-tracking study's Mamba-3 models, and what training does to it.

    python -m hybridlm.studies.parity_solution --lr 1.39e-3 --steps 150 [--eval-every 25]

The construction (docs/results.md §1; tests/test_parity_representable.py holds it at 3..1,024 symbols):
in one Mamba-3 mixer, Δ = 1 on '1' tokens and ≈ 0 on the others (only the ones write and turn), the
angle rate saturated (each '1' turns every rotated pair by π), A at its floor, λ = 1, B = C = e_0, the
gate open on '='. The output at '=' is Σ over the ones of cos(π·(ones after it)): 1 for an odd count,
0 for an even one. :func:`set_parity_model` puts it in a whole 1-layer model of the study (embedding,
mixer, SwiGLU silenced, head reading the indicator against a constant from a second head), so the
paper's recipe can be run from the solution itself: does training on short lengths keep it at 256?
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SPEC = Path(__file__).resolve().parents[2] / "specs/studies/state-tracking/paper-mamba3.yaml"
BIG = 30.0  # softplus(-30) ≈ 1e-13: Δ and A "off"; σ(30), tanh(30) = 1: λ and the angle rate saturated


def _rows(mixer) -> dict[str, slice]:
    rows, start = {}, 0
    for name, width in mixer.in_proj_layout().segments():
        rows[name] = slice(start, start + width)
        start += width
    return rows


@torch.no_grad()
def set_parity_mixer(mixer, one: int, zero: int, equals: int, scale: float = 1.0, turn: float = 1.0,
                     constant_head: bool = False) -> None:
    """Set ``mixer`` (a Mamba3) to the construction for inputs that are ``scale`` times one-hot vectors
    on dimensions ``one``, ``zero``, ``equals``. Head 0 channel 0 carries the odd-count indicator
    (times silu(5)) to output dimension 0; ``turn``: Δ on '1' tokens (each turns by π·turn).
    ``constant_head``: head 1 channel 0 also carries silu(5) on '=' (through D) to output dimension 1,
    a constant a readout can compare the indicator against."""
    rows, first = _rows(mixer), torch.arange(mixer.nheads) * mixer.headdim
    w = torch.zeros_like(mixer.in_proj.weight)
    w[rows["dt"], one] = math.log(math.expm1(turn)) / scale  # softplus⁻¹(turn), dt_bias 0
    w[rows["dt"], zero] = w[rows["dt"], equals] = -BIG / scale
    w[rows["A"], [one, zero, equals]] = -BIG / scale
    if "trap" in rows:
        w[rows["trap"], [one, zero, equals]] = BIG / scale
    if "angle" in rows:
        w[rows["angle"], [one, zero, equals]] = BIG / scale
    w[rows["x"].start + first[0], one] = 1.0 / scale
    if constant_head:
        w[rows["x"].start + first[1], equals] = 1.0 / scale
    w[rows["z"].start + first, equals] = 5.0 / scale
    # B and C through their projections (e_0 on every token), not their biases: RMSNorm(0) = 0 would
    # leave them at a point where any step of the projection is normed up to full size
    for name in ("B", "C"):
        w[rows[name].start, [one, zero, equals]] = 1.0 / scale
    mixer.in_proj.weight.copy_(w)
    for t in (mixer.dt_bias, mixer.D, mixer.out_proj.weight):
        t.zero_()
    if mixer.bc_bias:
        mixer.B_bias.zero_()
        mixer.C_bias.zero_()
    norm_of_e0 = math.sqrt(mixer.d_state)  # RMSNorm(e_0) = sqrt(N) e_0: weight 1/sqrt(N) gives e_0
    mixer.B_norm.weight.fill_(1 / norm_of_e0)
    mixer.C_norm.weight.fill_(1 / norm_of_e0)
    mixer.out_proj.weight[0, first[0]] = 1.0
    if constant_head:
        mixer.D[1] = 1.0
        mixer.out_proj.weight[1, first[1]] = 1.0


@torch.no_grad()
def set_parity_model(model, token: dict[str, int]) -> None:
    """A study model (``(M F) *1``, d_model ≥ 6) set to the construction: one-hot embeddings of '1', '0'
    and '=' on dimensions 0-2, the mixer's indicator and constant into dimensions 4 and 5 of the
    stream, the SwiGLU block silenced (w2 = 0), the head's '1' and '0' rows reading ±10·(indicator −
    constant / 2): about ±25 logits after the final norm."""
    emb = model.tok_embeddings.weight
    emb.zero_()
    for dim, symbol in enumerate(("1", "0", "=")):
        emb[token[symbol], dim] = 1.0
    mixer = model.layers[0].mixer
    set_parity_mixer(mixer, 0, 1, 2, scale=math.sqrt(model.spec.d_model), constant_head=True)
    routed = mixer.out_proj.weight.clone()
    mixer.out_proj.weight.zero_()
    mixer.out_proj.weight[4], mixer.out_proj.weight[5] = routed[0], routed[1]
    model.layers[1].mixer.w2.weight.zero_()
    head = model.output.weight
    head.zero_()
    head[token["1"], 4], head[token["1"], 5] = 10.0, -5.0
    head[token["0"], 4], head[token["0"], 5] = -10.0, 5.0


@torch.no_grad()
def turns_on_one(model, one_id: int) -> list[float]:
    """Per head of the first mixer, the turn a '1' token makes, in units of π: Δ times the mean
    tanh of its angle rates (each rotated pair turns by π·tanh(θ)·Δ)."""
    layer = model.layers[0]
    mixer = layer.mixer
    u = layer.norm(model.tok_embeddings.weight[one_id][None, None]).to(mixer.in_proj.weight.dtype)
    seg = mixer.in_proj_layout().split(mixer.in_proj(u))
    dt = F.softplus(seg["dt"][0, 0].float() + mixer.dt_bias)
    rate = torch.tanh(seg["angle"][0, 0].float()).mean() if "angle" in seg else torch.tensor(0.0)
    return [round(float(v), 5) for v in dt * rate]


def run(lr: float, steps: int, eval_every: int, max_length: int = 40, d_model: int = 32, samples: int = 512,
        log=print) -> list[dict]:
    """Train the study's 1-layer parity model from the hand-set solution with the paper's recipe (AdamW,
    no weight decay, no clipping, constant ``lr``), lengths 3..``max_length`` per example; returns
    (and logs) the held-out accuracy at ``max_length`` and 256 every ``eval_every`` steps."""
    from hybridlm.studies.state_tracking_settings import RunSettings
    from hybridlm.studies.state_tracking_train import Batches, accuracy, answer_logits, build_model

    s = RunSettings(task="parity", spec=str(SPEC), d_model=d_model, layers=1,
                    seed=0, steps=steps, batch=256, lr=lr, weight_decay=0.0, warmup_steps=0, min_lr_factor=1.0,
                    min_length=3, first_max=max_length, last_max=max_length, stages=1, steps_per_stage=steps,
                    length_per="example", eval_lengths=[max_length, 256], report_length=256, eval_every=eval_every,
                    eval_samples=samples, log_freq=eval_every)
    torch.manual_seed(0)
    model = build_model(s, "cpu")
    batches = Batches(s)
    set_parity_model(model, batches.task.token)
    held = {n: batches.held_out(n, samples) for n in (max_length, 256)}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history, started = [], time.time()

    def record(step: int, loss: float) -> None:
        entry = {"step": step, "loss": loss, **{f"accuracy@{n}": accuracy(model, b) for n, b in held.items()},
                 "turn_on_one": turns_on_one(model, batches.task.token["1"]), "seconds": round(time.time() - started, 1)}
        history.append(entry)
        log(json.dumps(entry))

    record(0, float("nan"))
    for step in range(steps):
        b = batches(step)
        loss = F.cross_entropy(answer_logits(model, b.ids, b.ends), b.answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps or step == 0:
            record(step + 1, loss.item())
    return history


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=1.39e-3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--max-length", type=int, default=40, help="training lengths 3..this (the first stage: 40)")
    args = p.parse_args(argv)
    run(args.lr, args.steps, args.eval_every, args.max_length)


if __name__ == "__main__":
    main()
