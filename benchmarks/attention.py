"""Causal attention on the GPU: FA4 (``flash_attn.cute``) next to PyTorch SDPA, in one process, bf16.

    python benchmarks/attention.py [--seqlen 2048,8192,16384] [--batch 8] [--d-model 2048]
        [--head-dim 64,128] [--kv-heads 0] [--json out.json]

Times the attention op alone (q, k, v -> out; the projections are the same GEMMs for both) at the
prefill benchmark's shapes: forward and forward+backward, ``triton.testing.do_bench`` median.
TFLOP/s counts the causal half: forward 2·B·H·L²·D, backward 2.5× that.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def time_backend(backend: str, batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    from triton.testing import do_bench

    from hybridlm.kernels.attention import causal_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, seqlen, h, head_dim, generator=g, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            causal_attention(q, k, v, backend=backend)

    def forward_backward():
        causal_attention(q, k, v, backend=backend).backward(dout)
        q.grad = k.grad = v.grad = None

    fwd = do_bench(forward, warmup=50, rep=300, return_mode="median")
    fwd_bwd = do_bench(forward_backward, warmup=50, rep=300, return_mode="median")
    flops = 2 * batch * heads * seqlen * seqlen * head_dim
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "fwd_tflops": flops / fwd / 1e9,
            "fwd_bwd_tflops": 3.5 * flops / fwd_bwd / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", default="2048,8192,16384")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--head-dim", default="64,128")
    parser.add_argument("--kv-heads", type=int, default=0, help="K/V heads (0: as many as query heads)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch}  d_model {args.d_model}  "
          f"bf16 causal")
    rows = []
    for head_dim in map(int, args.head_dim.split(",")):
        heads = args.d_model // head_dim
        kv_heads = args.kv_heads or heads
        for L in map(int, args.seqlen.split(",")):
            row = {"head_dim": head_dim, "heads": heads, "kv_heads": kv_heads, "seqlen": L}
            for backend in ("fa4", "sdpa"):
                row[backend] = time_backend(backend, args.batch, L, heads, kv_heads, head_dim)
            rows.append(row)
            print(json.dumps(row))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print("| head_dim | heads | L | FA4 fwd ms | SDPA fwd ms | FA4 fwd+bwd ms | SDPA fwd+bwd ms | FA4 TFLOP/s "
          "(fwd+bwd) | SDPA TFLOP/s (fwd+bwd) | SDPA ÷ FA4 (fwd+bwd) |")
    print("|" + "---|" * 10)
    for r in rows:
        a, s = r["fa4"], r["sdpa"]
        print(f"| {r['head_dim']} | {r['heads']}/{r['kv_heads']} | {r['seqlen']} | {a['fwd_ms']:.2f} | {s['fwd_ms']:.2f} "
              f"| {a['fwd_bwd_ms']:.2f} | {s['fwd_bwd_ms']:.2f} | {a['fwd_bwd_tflops']:.0f} | {s['fwd_bwd_tflops']:.0f} "
              f"| {s['fwd_bwd_ms'] / a['fwd_bwd_ms']:.2f}× |")


if __name__ == "__main__":
    main()
