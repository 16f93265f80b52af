"""Does any training recipe get a 1-layer Mamba-3 off chance on parity? (docs/results.md §1)

Study 1 found every model at chance. This probe trains the study's 1-layer spec with recipe
variants side by side (one process each, sharing one GPU) and logs loss and accuracy at 8, 40
and 256 symbols, so a plateau can be told from a recipe that is merely slow. It is a plain
PyTorch loop (no torchtitan): every example of a batch has one length, drawn from the paper's
curriculum (3..40 growing to 3..160 in four stages).

    python -m hybridlm.studies.parity_probe --seconds 500 --out runs/parity-probe
    python -m hybridlm.studies.parity_probe --seconds 500 --out runs/parity-probe --resume runs/parity-probe

``--resume`` continues every recipe from its checkpoint (weights, optimizer, step, data stream).
The paper's own protocol (its sweep, batch and schedule; the official module as a control) is the
study's ``--set protocol=paper`` (state_tracking_paper.py); this probe stays as it ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SPEC = Path(__file__).resolve().parents[2] / "specs/studies/state-tracking/mamba3-1layer.yaml"
ZERO, EQUALS = ord("0"), ord("=")  # byte-tokenizer ids, as the harness's parity task encodes them
SOFTPLUS_WIDE_DT = {"a_activation": "softplus", "dt_min": 0.3, "dt_max": 1.0}

# name -> recipe: lr, weight decay, batch, init_std, first curriculum max, and Mamba-3 spec fields.
RECIPES = {
    "base": {},                                  # the study's recipe: lr 1e-2, wd 0.1, batch 64
    "lr3e-3": {"lr": 3e-3},
    "batch256": {"batch": 256},                  # the paper's batch
    "softplus": {"block": {"a_activation": "softplus"}},  # A map before mamba_ssm #962
    "dt0.3-1": {"block": {"dt_min": 0.3, "dt_max": 1.0}},  # larger first turns
    "rope1": {"block": {"rope_fraction": 1.0}},  # every state pair rotates
    "real": {"block": {"rotation": False}},      # control: cannot do parity past memorization
    "softplus-dt-short": {"first_max": 10, "block": SOFTPLUS_WIDE_DT},  # curriculum from 3..10
    "softplus-dt": {"block": SOFTPLUS_WIDE_DT},
    "softplus-dt-wd0": {"wd": 0.0, "block": SOFTPLUS_WIDE_DT},
    "softplus-dt-lr3e-3": {"lr": 3e-3, "block": SOFTPLUS_WIDE_DT},
    "softplus-dt-batch256": {"batch": 256, "block": SOFTPLUS_WIDE_DT},
    "softplus-dt-rope1": {"block": {**SOFTPLUS_WIDE_DT, "rope_fraction": 1.0}},
    "softplus-dt-init0.1-wd0": {"wd": 0.0, "init_std": 0.1, "block": SOFTPLUS_WIDE_DT},
    "init0.1": {"init_std": 0.1},
}


def parity_batch(n: int, length: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The harness's ``parity`` examples ("0 1 1 = 0"), drawn as one tensor: the harness builds them
    one by one in Python, which would dominate a step of this 0.1M-parameter model."""
    bits = torch.randint(0, 2, (n, length), generator=gen)
    ids = torch.cat([bits + ZERO, torch.full((n, 1), EQUALS)], dim=1)
    return ids.to(device), (bits.sum(1) % 2 + ZERO).to(device)


def build(recipe: dict, device):
    import yaml

    from hybridlm import ModelSpec, build_model

    spec = yaml.safe_load(SPEC.read_text())
    spec["init_std"] = recipe.get("init_std", 0.02)
    spec["blocks"]["M"].update(recipe.get("block", {}))
    torch.manual_seed(0)
    return build_model(ModelSpec.model_validate(spec)).to(device)


def train(name: str, seconds: float, out: Path, resume: Path | None, stage_steps: int) -> None:
    recipe = RECIPES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(recipe, device)
    lr = recipe.get("lr", 1e-2)
    decayed = {n for n, p in model.named_parameters() if p.dim() >= 2 and "bias" not in n}  # not B/C biases
    matrices = [p for n, p in model.named_parameters() if n in decayed]
    others = [p for n, p in model.named_parameters() if n not in decayed]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": recipe.get("wd", 0.1)},
                             {"params": others, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    gen, step, history = torch.Generator().manual_seed(0), 0, []
    if resume and (resume / f"{name}.pt").exists():
        state = torch.load(resume / f"{name}.pt", map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, history = state["step"], state["history"]

    def accuracy(length: int) -> float:
        with torch.no_grad():
            ids, answer = parity_batch(512, length, torch.Generator().manual_seed(123), device)
            return (model(ids)[:, -1].argmax(-1) == answer).float().mean().item()

    first_max, start, smoothed = recipe.get("first_max", 40), time.time(), None
    while time.time() - start < seconds:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200)
        max_length = first_max + (160 - first_max) * min(step // stage_steps, 3) // 3
        length = int(torch.randint(3, max_length + 1, (1,), generator=gen))
        ids, answer = parity_batch(recipe.get("batch", 64), length, gen, device)
        loss = F.cross_entropy(model(ids)[:, -1].float(), answer)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if step % 500 == 0:
            history.append({"step": step, "loss": smoothed, "acc8": accuracy(8), "acc40": accuracy(40),
                            "acc256": accuracy(256)})
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                "history": history}, out / f"{name}.pt")
    (out / f"{name}.json").write_text(json.dumps({"steps": step, "history": history}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="base,lr3e-3,batch256,softplus,dt0.3-1,rope1,real,softplus-dt-short",
                        help=f"comma-separated, of: {', '.join(RECIPES)}")
    parser.add_argument("--seconds", type=float, default=500, help="training time of each recipe")
    parser.add_argument("--stage-steps", type=int, default=10_000, help="steps per curriculum stage")
    parser.add_argument("--out", type=Path, default=Path("runs/parity-probe"))
    parser.add_argument("--resume", type=Path, help="a previous --out to continue from")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        return train(args.one, args.seconds, args.out, args.resume, args.stage_steps)
    names = args.recipes.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    common = ["--seconds", str(args.seconds), "--stage-steps", str(args.stage_steps), "--out", str(args.out)]
    common += ["--resume", str(args.resume)] if args.resume else []
    procs = [subprocess.Popen([sys.executable, "-m", "hybridlm.studies.parity_probe", "--one", n, *common],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for n in names]
    failed = [n for n, p in zip(names, procs) if p.wait() != 0]
    summary = {}
    for name in names:
        path = args.out / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {"steps": 0, "history": []}
        history = record["history"]
        summary[name] = {"steps": record["steps"],
                         "final": history[-1] if history else None,
                         "min_loss": min((h["loss"] for h in history), default=None),
                         "best_acc256": max((h["acc256"] for h in history), default=None)}
        print(name, json.dumps(summary[name]))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if failed:
        sys.exit(f"recipes failed: {failed}")


if __name__ == "__main__":
    main()
