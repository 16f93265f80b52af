"""Per-parameter gradients of two parity models with the same weights on the same batch (fp32).

Made to find why the official control learns parity and hybridlm's Mamba-3 does not, should that
happen (docs/results.md §1): one step of each, parameter by parameter, the angle path first (the
angle rows of ``in_proj``, then Δ's rows and ``dt_bias``, then A's and trap's rows), then the rest.

    python -m hybridlm.studies.gradient_compare --d-model 32 --length 64 --batch 256 --out grads.json

On the GPU machine the default pair is the study's ``paper-mamba3.yaml`` (hybridlm's block, its
``auto`` backend) against ``paper-official.yaml`` (mamba_ssm's Mamba3): the official model is
built and then loaded with hybridlm's weights (the parameter names are the same), so the two
differ only in their code. ``--other-backend reference`` compares hybridlm's Triton path with its
plain-PyTorch reference instead (a check of the tool itself; it runs on a CPU too).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# in_proj segments along the angle path, in the order the report lists them
ANGLE_PATH = ("angle", "dt", "A", "trap")


@dataclass
class Row:
    name: str
    norm_a: float
    norm_b: float
    rel_diff: float  # |g_a - g_b| / |g_b|
    cosine: float


def _parts(model: nn.Module, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gradients by name, ``in_proj`` split into its segments (``layers.0.mixer.in_proj[angle]``, ...)."""
    out = {}
    layouts = {f"layers.{i}.mixer.in_proj.weight": layer.mixer.in_proj_layout()
               for i, layer in enumerate(model.layers) if hasattr(layer.mixer, "in_proj_layout")}
    for name, g in grads.items():
        layout = layouts.get(name)
        if layout is None:
            out[name] = g
            continue
        base = name.removesuffix(".weight")
        for segment, (start, width) in layout.offsets().items():
            out[f"{base}[{segment}]"] = g[start:start + width]
    return out


def _order(name: str) -> tuple:
    """The angle path first (by ANGLE_PATH, dt_bias beside dt's rows), then the rest by name."""
    for rank, segment in enumerate(ANGLE_PATH):
        if name.endswith(f"in_proj[{segment}]") or (segment == "dt" and name.endswith("dt_bias")):
            return (0, rank, name)
    return (1, 0, name)


def gradients(model: nn.Module, ids: Tensor, answers: Tensor) -> tuple[float, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model.output(model.features(ids)[:, -1]).float()
    loss = F.cross_entropy(logits, answers)
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def compare(model_a: nn.Module, model_b: nn.Module, ids: Tensor, answers: Tensor) -> dict:
    """One backward pass of each on (ids, answers); rows per parameter part, the angle path first."""
    loss_a, grads_a = gradients(model_a, ids, answers)
    loss_b, grads_b = gradients(model_b, ids, answers)
    missing = sorted(set(grads_a) ^ set(grads_b))
    if missing:
        raise ValueError(f"the two models' parameters differ: {', '.join(missing)}")
    parts_a, parts_b = _parts(model_a, grads_a), _parts(model_a, grads_b)
    rows = []
    for name in sorted(parts_a, key=_order):
        a, b = parts_a[name].flatten(), parts_b[name].flatten()
        norm_b = b.norm().item()
        rows.append(Row(name, a.norm().item(), norm_b, (a - b).norm().item() / max(norm_b, 1e-30),
                        F.cosine_similarity(a, b, dim=0, eps=1e-30).item()))
    return {"loss_a": loss_a, "loss_b": loss_b, "rows": [asdict(r) for r in rows]}


def format_rows(result: dict) -> str:
    lines = [f"loss: {result['loss_a']:.6f} (a) vs {result['loss_b']:.6f} (b)",
             f"{'parameter':48s} {'|g_a|':>11s} {'|g_b|':>11s} {'rel diff':>10s} {'cosine':>8s}"]
    lines += [f"{r['name']:48s} {r['norm_a']:11.4e} {r['norm_b']:11.4e} {r['rel_diff']:10.3e} {r['cosine']:8.5f}"
              for r in result["rows"]]
    return "\n".join(lines)


def parity_batch(n: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` parity examples of ``length`` bits from the study's own batch maker (byte tokens)."""
    from hybridlm.studies.state_tracking_settings import RunSettings
    from hybridlm.studies.state_tracking_train import Batches

    s = RunSettings(task="parity", spec="-", d_model=1, layers=1, seed=seed, steps=1, batch=n, lr=1.0,
                    weight_decay=0.0, warmup_steps=0, min_lr_factor=0.0, min_length=length, first_max=length,
                    last_max=length, stages=1, steps_per_stage=1, eval_lengths=[length], report_length=length,
                    eval_every=1, eval_samples=1, log_freq=1)
    batch = Batches(s)(0)
    return batch.ids, batch.answers


def main(argv: list[str] | None = None) -> int:
    from hybridlm.studies.state_tracking_settings import RunSettings
    from hybridlm.studies.state_tracking_train import build_model

    folder = Path(__file__).resolve().parents[2] / "specs/studies/state-tracking"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=folder / "paper-mamba3.yaml", help="model a (hybridlm's)")
    parser.add_argument("--other-spec", type=Path, default=folder / "paper-official.yaml", help="model b")
    parser.add_argument("--other-backend", default=None,
                        help="instead of --other-spec: model a's spec with this Mamba-3 backend (e.g. reference)")
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--length", type=int, default=64, help="parity bits per example")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, default=None, help="a best.pt or checkpoint.pt of the study to load")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    def settings(spec: Path) -> RunSettings:
        return RunSettings(task="parity", spec=str(spec), d_model=args.d_model, layers=args.layers, seed=args.seed,
                           steps=1, batch=args.batch, lr=1.0, weight_decay=0.0, warmup_steps=0, min_lr_factor=0.0,
                           min_length=3, first_max=3, last_max=3, stages=1, steps_per_stage=1, eval_lengths=[8],
                           report_length=8, eval_every=1, eval_samples=1, log_freq=1)

    model_a = build_model(settings(args.spec), args.device)
    if args.weights:
        model_a.load_state_dict(torch.load(args.weights, map_location=args.device, weights_only=False)["model"])
    if args.other_backend:
        model_b = build_model(settings(args.spec), args.device)
        for layer in model_b.layers:
            if hasattr(layer.mixer, "backend"):
                layer.mixer.backend = args.other_backend
    else:
        model_b = build_model(settings(args.other_spec), args.device)
    model_b.load_state_dict(model_a.state_dict())  # same names and shapes: same weights, bit for bit
    ids, answers = parity_batch(args.batch, args.length, args.seed)
    result = compare(model_a, model_b, ids.to(args.device), answers.to(args.device))
    result["settings"] = {k: str(v) for k, v in vars(args).items()}
    print(format_rows(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
