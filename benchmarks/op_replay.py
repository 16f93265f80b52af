"""Find which of our kernels a GPU run gets wrong: record every ``hybridlm`` custom op's inputs and outputs in one
forward+backward of a Mamba-3 layer on the GPU, then replay each op on the CPU under the Triton interpreter and
compare. The interpreter runs every product in fp32 (``ScanSpec.constexprs``), so a bf16 recording differs by
bf16 roundings (≈ 1e-2 relative) and a miscompiled kernel by far more.

    # on the GPU machine (as benchmarks/gpu/*.sh do: source .gpu/setup.sh first)
    python3 benchmarks/op_replay.py --record "$OUT/ops.pt" --d-model 128 --d-state 64 --seqlen 130
    # here, on the files that came back
    TRITON_INTERPRET=1 python benchmarks/op_replay.py --replay ops.pt

``--tunings`` takes knob=value pairs as ``benchmarks/prefill.py`` does, e.g. ``output_block_t=16``.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


class RecordOps(TorchDispatchMode):
    """Every hybridlm op call: (name, args, kwargs, outputs), on the CPU."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "hybridlm":
            self.calls.append((func._opname, to_cpu(args), to_cpu(kwargs or {}), to_cpu(out)))
        return out


def record_layer(args) -> list:
    """One forward+backward of a randomized layer (``args`` as the record command's), every op call."""
    from hybridlm.blocks import Mamba3
    from hybridlm.kernels.mamba3.tuning import use_tuning
    from hybridlm.testing import randomize_mamba3_

    from prefill import tuning_changes  # this script's folder is on the path

    dtype = dict(bf16=torch.bfloat16, fp32=torch.float32)[args.dtype]
    torch.manual_seed(0)
    layer = Mamba3(args.d_model, d_state=args.d_state, headdim=args.headdim, ngroups=args.ngroups,
                   is_mimo=args.mimo_rank > 1, mimo_rank=max(args.mimo_rank, 1), a_activation="softplus",
                   backend="triton", device=args.device, dtype=dtype)
    randomize_mamba3_(layer, seed=1)
    u = torch.randn(args.batch, args.seqlen, args.d_model, device=args.device, dtype=dtype, requires_grad=True)
    weights = torch.randn(u.shape, device=args.device, dtype=torch.float64)
    recorder = RecordOps()
    with use_tuning(**(tuning_changes(args.tunings) if args.tunings else {})), recorder:
        (layer(u).double() * weights).sum().backward()
    return recorder.calls


def record(args) -> None:
    calls = record_layer(args)
    torch.save(calls, args.record)
    print(f"{len(calls)} op calls to {args.record}: {[c[0] for c in calls]}")


def replay_errors(calls: list) -> list[tuple[str, list[float | None]]]:
    """Each recorded call run again here: (op name, each output's relative error against the recording)."""
    import hybridlm.kernels.mamba3.triton  # noqa: F401  (registers the scan's ops)
    from hybridlm.kernels.mamba3.triton import angles, inputs  # noqa: F401  (and these)
    from hybridlm.testing import rel_err

    out = []
    for name, op_args, op_kwargs, recorded in calls:
        ours = getattr(torch.ops.hybridlm, name)(*op_args, **op_kwargs)
        pairs = zip(ours if isinstance(ours, (list, tuple)) else [ours],
                    recorded if isinstance(recorded, (list, tuple)) else [recorded])
        out.append((name, [rel_err(a.double(), b.double()) if isinstance(a, torch.Tensor) and a.numel() else None
                           for a, b in pairs]))
    return out


def replay(args) -> None:
    for name, errors in replay_errors(torch.load(args.replay, weights_only=False)):
        print(f"{name:22s} {' '.join('-' if e is None else f'{e:.1e}' for e in errors)}")


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = cli.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="OUT", help="on the GPU: one layer's forward+backward, every op call saved")
    mode.add_argument("--replay", metavar="FILE", help="on the CPU (TRITON_INTERPRET=1): each op again, compared")
    for flag, default in (("--d-model", 128), ("--d-state", 64), ("--headdim", 64), ("--ngroups", 1),
                          ("--mimo-rank", 1), ("--batch", 2), ("--seqlen", 130)):
        cli.add_argument(flag, type=int, default=default)
    cli.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    cli.add_argument("--device", default="cuda", help="cpu: the interpreter's own run (a check of this tool)")
    cli.add_argument("--tunings", default=None, help='knob=value pairs, ","-separated, e.g. "output_block_t=16"')
    return cli


def main() -> None:
    args = parser().parse_args()
    (record if args.record else replay)(args)


if __name__ == "__main__":
    main()
