"""Mamba-3 decode on the GPU: one layer's step next to the official step, against the memory
roofline, and end-to-end generation of a hybrid model.

    python benchmarks/decode.py [--batch 1,16,128] [--d-state 64,128] [--mimo-rank 1,4]
        [--d-model 2048] [--headdim 64] [--backends cute,triton,"cute[cute_prerotate=1]"] [--no-peer]
        [--e2e specs/hybrid-1.5b.yaml] [--e2e-batch 1,128] [--prompt 2048] [--new-tokens 256]
        [--json out.json]

Layer step: the whole layer for one token (in_proj, the step, out_proj), bf16 weights, fp32
state updated in place, captured in a CUDA graph and replayed (``triton.testing.do_bench_cudagraph``,
median); the official module's ``step`` on the same weights is measured the same way in the same
run. Roofline: (the layer's parameter bytes + the decode state read and written) ÷ the device
copy bandwidth measured here. ``kernel_ms`` times the step kernel alone (no projections).
End to end: random-init weights of the given spec, a random prompt of ``--prompt`` tokens, then
greedy generation; tokens/s counts the generated tokens of the whole batch over the decode time
(benchmarks/generate.py's measurement; that script runs the four 1.5B presets side by side).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

BF16 = torch.bfloat16


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def build_layer(d_model: int, d_state: int, headdim: int, mimo_rank: int, with_peer: bool):
    """Ours and, if asked, the official module with the same weights (softplus A as the peer)."""
    from hybridlm.blocks import Mamba3
    from hybridlm.testing import randomize_mamba3_

    kw = dict(d_model=d_model, d_state=d_state, headdim=headdim)
    if mimo_rank > 1:
        kw.update(is_mimo=True, mimo_rank=mimo_rank)
    torch.manual_seed(0)
    ours = Mamba3(**kw, a_activation="softplus", device="cuda", dtype=BF16)
    randomize_mamba3_(ours, seed=1)
    peer = None
    if with_peer:
        import mamba_ssm.modules.mamba3 as official

        if mimo_rank > 1:  # the MIMO module asserts TileLang imported; its CuTe step does not need it
            official.mamba3_mimo_combined = official.mamba3_mimo_combined or object()
        peer = official.Mamba3(**kw, layer_idx=0, device="cuda", dtype=BF16)
        peer.load_state_dict(ours.state_dict(), strict=True)
    return ours, peer


def roofline_bytes(layer, batch: int) -> int:
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    return params + 2 * batch * layer.state_bytes()


def time_graph(fn) -> float:
    from triton.testing import do_bench_cudagraph

    with torch.no_grad():
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=200, return_mode="median")


def time_ours(layer, batch: int, backend: str) -> dict:
    from hybridlm.kernels import dispatch
    from hybridlm.testing import random_decode_state

    layer.backend = backend
    cache = random_decode_state(layer, batch)
    u = torch.randn(batch, 1, layer.d_model, device="cuda", dtype=BF16)
    ms = time_graph(lambda: layer(u, cache=cache))
    proj = torch.randn(batch, layer.in_proj.out_features, device="cuda", dtype=BF16)
    layout, params = layer.decode_layout(), layer.decode_params()
    kernel_ms = time_graph(lambda: dispatch.mamba3_decode_step(proj, cache.state, params, layout, backend=backend))
    return {"ms": ms, "kernel_ms": kernel_ms}


def time_peer(peer, batch: int) -> float:
    states = peer.allocate_inference_cache(batch, 1)
    u = torch.randn(batch, peer.d_model, device="cuda", dtype=BF16)
    return time_graph(lambda: peer.step(u, *states))


def split_backends(text: str) -> list[str]:
    """``"cute,cute[cute_max_rows=8,cute_min_blocks=2]"`` -> the two backends: commas inside brackets
    separate a backend's knobs."""
    return [b for b in re.split(r",(?![^\[]*\])", text) if b]


def backend_and_tuning(backend: str) -> tuple[str, dict]:
    """``"cute[cute_prerotate=1]"`` -> ("cute", {"cute_prerotate": 1}): a backend under other kernel knobs,
    timed as a column of its own (prefill.py's --tunings syntax inside the brackets)."""
    from prefill import tuning_changes  # benchmarks/prefill.py, beside this script

    name, _, knobs = backend.partition("[")
    return name, tuning_changes(knobs.rstrip("]")) if knobs else {}


def layer_rows(args, bandwidth: float) -> list[dict]:
    from hybridlm.kernels.mamba3.tuning import use_tuning

    rows = []
    for rank in args.mimo_rank:
        for d_state in args.d_state:
            ours, peer = build_layer(args.d_model, d_state, args.headdim, rank, not args.no_peer)
            for batch in args.batch:
                row = {"d_state": d_state, "mimo_rank": rank, "batch": batch}
                roof_ms = roofline_bytes(ours, batch) / bandwidth * 1e3
                row["roofline_ms"] = roof_ms
                for backend in args.backends:
                    kernel_backend, changes = backend_and_tuning(backend)
                    try:
                        with use_tuning(**changes):
                            t = time_ours(ours, batch, kernel_backend)
                    except Exception as e:  # keep measuring the others; the row says what failed
                        row[f"{backend}_error"] = f"{type(e).__name__}: {e}"[:300]
                        continue
                    row[f"{backend}_ms"], row[f"{backend}_kernel_ms"] = t["ms"], t["kernel_ms"]
                    row[f"{backend}_roofline_frac"] = roof_ms / t["ms"]
                if peer is not None:
                    row["official_ms"] = time_peer(peer, batch)
                    row["official_roofline_frac"] = roof_ms / row["official_ms"]
                print(json.dumps(row), flush=True)
                rows.append(row)
            del ours, peer
            torch.cuda.empty_cache()
    return rows


def e2e_rows(args) -> list[dict]:
    """Generation with one spec at each ``--e2e-batch``: benchmarks/generate.py's measurement
    (fused norms, CUDA-graph steps, the prompt prefilled in one forward)."""
    from generate import Case, measure  # benchmarks/generate.py, beside this script

    from hybridlm.builder import build_model
    from hybridlm.layouts.presets import spec_or_preset

    spec = spec_or_preset(args.e2e)
    model = build_model(spec, device="cuda", dtype=BF16, seed=0).eval()
    rows = []
    for batch in args.e2e_batch:
        case = Case("a", args.e2e, batch, args.prompt, args.new_tokens, "fused")
        t = measure(model, case, token_budget=batch * args.prompt)
        row = {"spec": args.e2e, "batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
               "prefill_s": t["prefill_s"], "decode_s": t["decode_s"],
               "decode_tokens_per_s": t["generated_tokens_per_s"], "ms_per_step": t["ms_per_step"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], backends: list[str]) -> None:
    cols = ["d_state", "mimo_rank", "batch", "roofline_ms"]
    for b in backends:
        cols += [f"{b}_ms", f"{b}_roofline_frac", f"{b}_kernel_ms"]
    cols += ["official_ms", "official_roofline_frac"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "—"))
                                for c in cols) + " |")


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=ints, default=[1, 16, 128])
    p.add_argument("--d-state", type=ints, default=[64, 128])
    p.add_argument("--mimo-rank", type=ints, default=[1, 4])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--backends", type=split_backends, default=["cute", "triton"])
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-layer", action="store_true", help="skip the layer-step table")
    p.add_argument("--e2e", default=None, help="spec or preset for end-to-end generation")
    p.add_argument("--e2e-batch", type=ints, default=[1, 128])
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    result["copy_bandwidth_TBps"] = bw = copy_bandwidth() / 1e12
    print(f"copy bandwidth {bw:.2f} TB/s", flush=True)
    if not args.no_layer:
        result["layer"] = layer_rows(args, bw * 1e12)
        print_table(result["layer"], args.backends)
    if args.e2e:
        result["e2e"] = e2e_rows(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
