"""Training throughput of the plain-PyTorch path on CPU (the path CI and CPU demos train with).

    python benchmarks/cpu_reference.py [--presets tiny-hybrid,mamba3-tiny] [--batch 16] [--seq 256]

Prints forward+backward tokens/s per preset (median of --repeat runs after one warm-up).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hybridlm


def measure(preset: str, batch: int, seq: int, repeat: int) -> float:
    spec = hybridlm.get_preset(preset)
    model = hybridlm.build_model(spec, seed=0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq + 1))
    times = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return batch * seq / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny-hybrid,mamba3-tiny,mamba3-mimo-tiny,mamba2like-tiny,"
                                              "hybrid-tiny,transformer-tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x seq {args.seq}, fwd+bwd")
    print(f"{'preset':20s} {'params':>8s} {'tokens/s':>10s}")
    for preset in args.presets.split(","):
        params = hybridlm.account(hybridlm.get_preset(preset)).total_params
        print(f"{preset:20s} {params / 1e6:7.2f}M {measure(preset, args.batch, args.seq, args.repeat):10.0f}")


if __name__ == "__main__":
    main()
