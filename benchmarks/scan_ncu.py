"""One forward+backward of our Mamba-3 layer and the official one, between cudaProfilerStart and
Stop, for Nsight Compute (issue 17: where the backward chunk kernel's time goes).

    ncu --clock-control none --profile-from-start off --set full -k regex:'chunk_bwd|dqkv' \
        python3 benchmarks/scan_ncu.py [--d-state 64] [--seqlen 2048] [--peer-configs F] [--mimo-rank 1]

Warm-up (Triton compiles, the official configs pinned from --peer-configs) runs outside the
profiled range, so ncu sees each kernel of one step once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prefill import build_pair  # noqa: E402

from hybridlm.kernels.official_autotune import pin_chosen  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--mimo-rank", type=int, default=1)
    parser.add_argument("--peer-configs", type=Path, default=None)
    args = parser.parse_args()
    with_peer = args.peer_configs is not None and args.mimo_rank == 1
    if with_peer:
        pin_chosen(args.peer_configs)
    ours, peer = build_pair(args.d_model, args.d_state, args.headdim, args.mimo_rank, with_peer)
    u = torch.randn(args.batch, args.seqlen, args.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(u)
    layers = [layer for layer in (ours, peer) if layer is not None]
    for _ in range(2):
        for layer in layers:
            layer(u).backward(grad)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for layer in layers:
        layer(u).backward(grad)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
