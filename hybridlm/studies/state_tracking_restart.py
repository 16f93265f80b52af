"""A paused state-tracking run restarted with Adam's second moments as saved or floored: the test of a reading
in docs/results.md §1 (a run that solved one curriculum stage lost it in the first hundred steps of the next;
the reading: while the loss sat at zero Adam's second moments decayed, so the new stage's first, larger
gradients took steps of up to ≈ 3 × lr on every weight).

    python -m hybridlm.studies.state_tracking_restart FROM OUT --second-moments floor FLAGS...
    python -m hybridlm.studies.state_tracking_train --out OUT FLAGS... --stop-after-steps 500

FLAGS are the run's own (state_tracking_settings.FLAGS). The first command copies FROM/checkpoint.pt into OUT
and, with ``floor``, raises every parameter's second moment to at least the square of its gradient on the batch
of the step the checkpoint stopped before (as if Adam had seen a gradient that large lately: an element's first
update is then at most about |m̂| ÷ |g|, where moments decayed during a quiet stretch let it reach ≈ 3 × lr);
with ``keep`` it changes nothing (the control). (Replacing the moments by g² alone is no control: where the new
gradient is small against the momentum, the update grows without bound — 478 × lr at the stage switch of a
CPU run of the parity protocol.) Either way it writes OUT/restart.json: the update each parameter tensor would
take on that batch, |Adam's step| ÷ lr (its mean and largest element), as saved and after the floor. The second
command trains on from there, evaluating as the run was set to.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from hybridlm.studies.state_tracking_settings import RunSettings
from hybridlm.studies.state_tracking_train import Trainer


def next_gradients(trainer: Trainer) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Each parameter's gradient of the loss on the batch of the trainer's next step (weights unchanged)."""
    batch = trainer.batches(trainer.step)
    trainer.opt.zero_grad(set_to_none=True)
    trainer.loss(*(t.to(trainer.device) for t in batch)).backward()
    grads = {p: p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None}
    trainer.opt.zero_grad(set_to_none=True)
    return grads


def update_sizes(trainer: Trainer, grads: dict) -> dict:
    """|m̂ / (√v̂ + ε)|, the size of AdamW's next step in units of lr (weight decay aside), per parameter tensor
    (mean and largest element) and over all, with the optimizer's moments as they are now and ``grads``."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    sizes, largest, total, count = {}, 0.0, 0.0, 0
    for group in trainer.opt.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = trainer.opt.state.get(p)
            if p not in grads or not state:
                continue
            g, t = grads[p], float(state["step"]) + 1
            m = beta1 * state["exp_avg"] + (1 - beta1) * g
            v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
            step = (m / (1 - beta1 ** t)).abs() / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
            sizes[names[p]] = {"mean": step.mean().item(), "max": step.max().item()}
            largest, total, count = max(largest, step.max().item()), total + step.sum().item(), count + step.numel()
    return {"mean": total / max(count, 1), "max": largest, "tensors": sizes}


def floor_second_moments(trainer: Trainer, grads: dict) -> None:
    """Every second moment at least its gradient's square (bias correction at these step counts is ≈ 1)."""
    for p, g in grads.items():
        state = trainer.opt.state.get(p)
        if state:
            torch.maximum(state["exp_avg_sq"], g * g, out=state["exp_avg_sq"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("source", type=Path, help="the paused run's folder (its checkpoint.pt)")
    parser.add_argument("out", type=Path, help="the restarted run's folder")
    parser.add_argument("--second-moments", choices=("keep", "floor"), required=True)
    parser.add_argument("--run-key", default="", help="the run key the checkpoint was written under")
    parser.add_argument("--device", default=None)
    args, flags = parser.parse_known_args(argv)
    checkpoint = args.source / "checkpoint.pt"
    if not checkpoint.is_file():
        parser.error(f"no checkpoint.pt in {args.source}: pause the run first (--stop-after-steps)")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, args.out / "checkpoint.pt")
    trainer = Trainer(RunSettings.from_flags(flags), args.out, args.run_key, args.device)
    resumed = trainer.resume()
    if not resumed.startswith("resumed"):
        parser.error(f"{checkpoint}: {resumed} (give the run's own FLAGS and --run-key)")
    grads = next_gradients(trainer)
    report = {"source": str(args.source), "step": trainer.step, "second_moments": args.second_moments,
              "as_saved": update_sizes(trainer, grads)}
    if args.second_moments == "floor":
        floor_second_moments(trainer, grads)
        report["after_floor"] = update_sizes(trainer, grads)
        trainer.save_checkpoint()
    (args.out / "restart.json").write_text(json.dumps(report, indent=1) + "\n")
    after = report.get("after_floor", report["as_saved"])
    print(f"[restart] step {trainer.step}, second moments {args.second_moments}: next update ÷ lr, mean "
          f"{report['as_saved']['mean']:.3g} max {report['as_saved']['max']:.3g} as saved; "
          f"mean {after['mean']:.3g} max {after['max']:.3g} now", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
