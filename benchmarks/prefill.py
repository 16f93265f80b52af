"""Mamba-3 prefill (training-shaped) throughput on the GPU: our Triton path next to the official
``mamba_ssm`` module, in one process, same weights, bf16.

    python benchmarks/prefill.py [--peer-configs benchmarks/peer_autotune_h200.json] [--tune]
        [--d-state 64,128] [--seqlen 2048,8192,16384] [--batch 8] [--d-model 2048] [--headdim 64]
        [--mimo-rank 4] [--backward-kernels 1,2] [--outproj-norm] [--json out.json] [--profile]

Times the whole layer (projections, norms, scan, gate, output projection) forward and
forward+backward with ``triton.testing.do_bench`` (median). The official kernels run only with the
configs its own autotuner picked: ``--tune`` runs its full autotune (minutes on a fresh machine)
and writes the chosen configs to ``--peer-configs`` (keeping those already there, so the tune can
be split over calls, one d_state each); without ``--tune`` that file is loaded and
pinned, so no config is ever picked by hand. The autotune keys hold no sequence length or batch,
so one tuning per d_state covers every length. ``--peer-configs`` defaults to
``benchmarks/peer_autotune_<gpu>.json`` for this GPU (h100, h200, ...).

``--tune-workers N`` (default 16) compiles the official kernels' candidate configs first, N
processes at a time, one config of every autotuned kernel a process, into Triton's cache; the
autotune that follows then only times them (its compiles, one after another, were most of its
5-8 minutes per d_state).

``--backward-kernels`` times our layers once per backward design, in one run: 1 the fused chunk
kernel, 2 the split pair (``KernelTuning.triton_backward_kernels``). ``--tunings`` adds variants
with other kernel knobs, ``;`` between sets of ``knob=value`` (``KernelTuning`` fields, the
``triton_`` prefix optional), e.g. ``--tunings "bias_rows=1024;bias_rows=512"``: an A/B of knobs
side by side in one run. The table has a row per variant (column "variant"); the JSON keys of
every variant but the fused default end in ``[its label]`` (``ours[split]``, ``ours[bias_rows=1024]``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hybridlm.kernels.official_autotune import gpu_slug, official_autotuners, pin_chosen, save_chosen


def save_peer_configs(path: Path) -> None:
    print(f"saved the official autotuner's choices for {save_chosen(path)} kernels to {path}")


def narrow_peer_configs(index: int) -> None:
    """Leave every official autotuner one candidate, its config ``index`` (modulo its count): a
    tuner with one config runs it without timing, so one step compiles exactly that config."""
    for tuner in official_autotuners().values():
        tuner.configs = [tuner.configs[index % len(tuner.configs)]]


def precompile_peer_configs(args, workers: int) -> None:
    """Compile every candidate config of the official kernels into Triton's cache, ``workers``
    processes at a time (each runs one layer step with ``--precompile-config i``)."""
    import subprocess
    import time

    count = max(len(t.configs) for t in official_autotuners().values())
    base = [sys.executable, __file__, "--d-state", args.d_state, "--seqlen", args.seqlen.split(",")[0],
            "--batch", str(args.batch), "--d-model", str(args.d_model), "--headdim", str(args.headdim)]
    start, running, failed = time.time(), [], 0
    for i in range(count):
        while len(running) >= workers:  # wait for the oldest
            failed += running.pop(0).wait() != 0
        running.append(subprocess.Popen(base + ["--precompile-config", str(i)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    failed += sum(p.wait() != 0 for p in running)
    print(f"compiled {count} candidate configs of the official kernels in {time.time() - start:.0f} s "
          f"({workers} processes; {failed} failed, left to the autotune)")


def precompile_one(args, index: int) -> None:
    narrow_peer_configs(index)
    for n in map(int, args.d_state.split(",")):
        peer = build_pair(args.d_model, n, args.headdim, 1, True)[1]
        u = torch.randn(args.batch, int(args.seqlen.split(",")[0]), args.d_model, device="cuda",
                        dtype=torch.bfloat16, requires_grad=True)
        peer(u).sum().backward()
    torch.cuda.synchronize()


def default_peer_configs() -> Path:
    """benchmarks/peer_autotune_<gpu>.json, <gpu> the model in the device name (h100, h200, ...)."""
    return Path(__file__).parent / f"peer_autotune_{gpu_slug(torch.cuda.get_device_name())}.json"


BACKWARD_LABELS = {1: "fused", 2: "split"}


def backward_designs(text: str) -> list[int]:
    """``--backward-kernels`` -> the designs to time, checked by KernelTuning."""
    from hybridlm.kernels.mamba3.tuning import KernelTuning

    designs = []
    for item in text.split(","):
        try:
            designs.append(KernelTuning(triton_backward_kernels=int(item)).triton_backward_kernels)
        except ValueError as e:
            sys.exit(f"--backward-kernels {item!r}: {e}")
    return designs


def tuning_changes(text: str) -> dict:
    """``"bias_rows=1024,warps=8"`` -> ``{"triton_bias_rows": 1024, "triton_warps": 8}``, checked by
    KernelTuning."""
    import dataclasses

    from hybridlm.kernels.mamba3.tuning import KernelTuning

    fields = {f.name for f in dataclasses.fields(KernelTuning)}
    changes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name = name.strip() if name.strip() in fields else f"triton_{name.strip()}"
        if name not in fields or not value.strip().isdigit():
            sys.exit(f"--tunings {text!r}: {item!r} is not knob=integer (knobs: {', '.join(sorted(fields))})")
        changes[name] = int(value)
    try:
        KernelTuning(**changes)
    except ValueError as e:
        sys.exit(f"--tunings {text!r}: {e}")
    return changes


def variants(backward_kernels: str, tunings: str | None) -> list[tuple[str, dict]]:
    """(label, KernelTuning changes) of every variant of our layers to time: the backward designs,
    then the --tunings sets."""
    out = [(BACKWARD_LABELS[d], {"triton_backward_kernels": d}) for d in backward_designs(backward_kernels)]
    return out + [(text.strip(), tuning_changes(text)) for text in (tunings or "").split(";") if text.strip()]


def ours_key(base: str, label: str) -> str:
    """A row's key for one of our layers under a variant: the fused default keeps the plain key
    ("ours", "ours_mimo4"), so a default run's JSON reads as before."""
    return base if label == BACKWARD_LABELS[1] else f"{base}[{label}]"


def build_pair(d_model: int, d_state: int, headdim: int, mimo_rank: int, with_peer: bool, outproj_norm: bool = False):
    from hybridlm.blocks import Mamba3
    from hybridlm.testing import randomize_mamba3_

    kw = dict(d_model=d_model, d_state=d_state, headdim=headdim, chunk_size=64 // mimo_rank)
    if outproj_norm:  # the grouped RMSNorm before out_proj (both modules' is_outproj_norm): the hybrid presets' layer
        kw.update(is_outproj_norm=True)
    if mimo_rank > 1:
        kw.update(is_mimo=True, mimo_rank=mimo_rank)
    torch.manual_seed(0)
    ours = Mamba3(**kw, a_activation="softplus", backend="triton", device="cuda", dtype=torch.bfloat16)
    randomize_mamba3_(ours, seed=1)
    peer = None
    if with_peer:
        from mamba_ssm.modules.mamba3 import Mamba3 as Official

        peer = Official(**kw, layer_idx=0, device="cuda", dtype=torch.bfloat16)
        peer.load_state_dict(ours.state_dict(), strict=True)
    return ours, peer


def time_layer(layer, batch: int, seqlen: int, d_model: int) -> dict:
    from triton.testing import do_bench

    u = torch.randn(batch, seqlen, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(u)

    def forward():
        with torch.no_grad():
            layer(u)

    def forward_backward():
        layer(u).backward(grad)
        u.grad = None
        for p in layer.parameters():
            p.grad = None

    fwd = do_bench(forward, warmup=100, rep=400, return_mode="median")
    fwd_bwd = do_bench(forward_backward, warmup=100, rep=400, return_mode="median")
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "tokens_per_s_fwd_bwd": batch * seqlen / fwd_bwd * 1e3}


def time_or_error(layer, batch: int, seqlen: int, d_model: int) -> dict:
    """time_layer, or {"error": ...} when our layer fails to compile or run at this shape (one
    shape's failure, e.g. out of shared memory, must not cost the other measurements)."""
    try:
        return time_layer(layer, batch, seqlen, d_model)
    except Exception as e:  # noqa: BLE001 - any compile/launch failure is reported in the row
        torch.cuda.synchronize()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def time_projections(layer, batch: int, seqlen: int, d_model: int) -> float:
    """Forward+backward ms of the layer's in_proj and out_proj GEMMs alone: the floor every
    implementation of the layer shares, so (layer − projections) is the scan's own cost."""
    from triton.testing import do_bench

    u = torch.randn(batch, seqlen, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(batch, seqlen, layer.out_proj.in_features, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)

    def forward_backward():
        layer.in_proj(u).backward(torch.ones((), device="cuda").expand(batch, seqlen, layer.in_proj.out_features))
        layer.out_proj(h).backward(torch.ones((), device="cuda").expand(batch, seqlen, d_model))
        u.grad = h.grad = None
        for p in layer.parameters():
            p.grad = None

    return do_bench(forward_backward, warmup=50, rep=200, return_mode="median")


def profile_layer(layer, batch: int, seqlen: int, d_model: int, top: int = 45) -> str:
    from torch.profiler import ProfilerActivity, profile

    u = torch.randn(batch, seqlen, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(u)
    for _ in range(3):
        layer(u).backward(grad)
    torch.cuda.synchronize()
    steps = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            layer(u).backward(grad)
        torch.cuda.synchronize()
    kernels = prof.key_averages().table(sort_by="self_device_time_total", row_limit=top)
    return kernels + "\n" + torch_op_table(prof.key_averages(group_by_input_shape=True), steps)


def torch_op_table(averages, steps: int, top: int = 25) -> str:
    """The torch ops (aten::) whose kernels take the most device time a step, with their input shapes:
    which of the layer's glue the kernel rows above come from."""
    def device_us(e):
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)

    rows = [e for e in averages if e.key.startswith("aten::") and device_us(e) > 0]
    rows.sort(key=device_us, reverse=True)
    lines = [f"torch ops by device time a step ({steps} steps; nested ops count in their callers too)",
             f"{'us/step':>9} {'calls/step':>10}  op  input shapes"]
    for e in rows[:top]:
        lines.append(f"{device_us(e) / steps:9.1f} {e.count / steps:10.1f}  {e.key}  {e.input_shapes}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-state", default="64,128")
    parser.add_argument("--seqlen", default="2048,8192,16384")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--mimo-rank", type=int, default=4, help="also time our MIMO at this rank (0: skip)")
    parser.add_argument("--outproj-norm", action="store_true",
                        help="layers with the grouped RMSNorm before out_proj (is_outproj_norm), as in the hybrid presets")
    parser.add_argument("--backward-kernels", default="1",
                        help="our backward designs to time, comma-separated: 1 fused, 2 split")
    parser.add_argument("--tunings", default=None,
                        help='more variants of our layers: ";" between sets of knob=value, e.g. "bias_rows=1024"')
    parser.add_argument("--peer-configs", type=Path, default=None,
                        help="the official autotuner's choices (JSON); default benchmarks/peer_autotune_<gpu>.json")
    parser.add_argument("--tune", action="store_true", help="run the official full autotune, save to --peer-configs")
    parser.add_argument("--tune-workers", type=int, default=16,
                        help="with --tune: processes that compile the candidate configs first (0: none)")
    parser.add_argument("--precompile-config", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="print a CUDA kernel table per layer (first shape)")
    args = parser.parse_args()
    if args.precompile_config is not None:  # a worker of precompile_peer_configs
        return precompile_one(args, args.precompile_config)

    from hybridlm.kernels.mamba3.tuning import use_tuning

    designs = variants(args.backward_kernels, args.tunings)
    with_peer = not args.no_peer
    if with_peer:
        if args.peer_configs is None:
            args.peer_configs = default_peer_configs()
        if not args.tune:
            if not args.peer_configs.exists():
                sys.exit(f"{args.peer_configs} does not exist: run once with --tune to write it (or --no-peer)")
            print(f"pinned {pin_chosen(args.peer_configs)} official autotune choices from {args.peer_configs}")
        elif args.peer_configs.exists():  # tune what is missing (say, another d_state), keep what is there
            print(f"kept {pin_chosen(args.peer_configs)} official autotune choices from {args.peer_configs}; "
                  "tuning the rest")
        if args.tune and args.tune_workers > 0:
            precompile_peer_configs(args, args.tune_workers)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch}  d_model {args.d_model}  "
          f"headdim {args.headdim}  bf16  out_proj norm {args.outproj_norm}  variants {', '.join(label for label, _ in designs)}")
    rows = []
    for n in map(int, args.d_state.split(",")):
        ours, peer = build_pair(args.d_model, n, args.headdim, 1, with_peer, args.outproj_norm)
        mimo = (build_pair(args.d_model, n, args.headdim, args.mimo_rank, False, args.outproj_norm)[0]
                if args.mimo_rank > 1 else None)
        for i, L in enumerate(map(int, args.seqlen.split(","))):
            row = {"d_state": n, "seqlen": L, "outproj_norm": args.outproj_norm,
                   "projections_fwd_bwd_ms": time_projections(ours, args.batch, L, args.d_model)}
            for label, changes in designs:
                with use_tuning(**changes):
                    row[ours_key("ours", label)] = time_or_error(ours, args.batch, L, args.d_model)
                    if mimo is not None:
                        row[ours_key(f"ours_mimo{args.mimo_rank}", label)] = time_or_error(mimo, args.batch, L,
                                                                                             args.d_model)
            if peer is not None:
                row["official"] = time_layer(peer, args.batch, L, args.d_model)
                if args.tune:
                    save_peer_configs(args.peer_configs)
            rows.append(row)
            print(json.dumps(row))
            if args.json:  # after every shape, so a run cut short keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
            if args.profile and i == 0:
                for label, changes in designs:
                    with use_tuning(**changes):
                        for name, layer, key in (("ours", ours, "ours"),
                                                 ("ours MIMO", mimo, f"ours_mimo{args.mimo_rank}")):
                            if layer is not None and "error" not in row[ours_key(key, label)]:
                                print(f"--- {name} [{label}], d_state {n}, L {L}\n"
                                      f"{profile_layer(layer, args.batch, L, args.d_model)}")
                if peer is not None:
                    print(f"--- official, d_state {n}, L {L}\n{profile_layer(peer, args.batch, L, args.d_model)}")
        del ours, peer, mimo
        torch.cuda.empty_cache()
    print_table(rows, args.mimo_rank, designs)


def print_table(rows: list[dict], mimo_rank: int, designs: list[tuple[str, dict]]) -> None:
    head = ("| d_state | L | variant | ours fwd ms | official fwd ms | ours fwd+bwd ms | official fwd+bwd ms "
            "| official ÷ ours (fwd+bwd) | ours Mtok/s | projections fwd+bwd ms "
            "| scan speed-up (layer − projections) |")
    if mimo_rank > 1:
        head += f" MIMO R={mimo_rank} fwd+bwd ms | MIMO ÷ SISO |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        p = r.get("official")
        gemm = r["projections_fwd_bwd_ms"]
        for label, _ in designs:
            o = r[ours_key("ours", label)]
            if "error" in o:
                print(f"| {r['d_state']} | {r['seqlen']} | {label} | {o['error']} |")
                continue
            cells = [r["d_state"], r["seqlen"], label, f"{o['fwd_ms']:.2f}", f"{p['fwd_ms']:.2f}" if p else "—",
                     f"{o['fwd_bwd_ms']:.2f}", f"{p['fwd_bwd_ms']:.2f}" if p else "—",
                     f"{p['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}×" if p else "—",
                     f"{o['tokens_per_s_fwd_bwd'] / 1e6:.2f}", f"{gemm:.2f}",
                     f"{(p['fwd_bwd_ms'] - gemm) / (o['fwd_bwd_ms'] - gemm):.2f}×" if p else "—"]
            m = r.get(ours_key(f"ours_mimo{mimo_rank}", label))
            if m and "error" in m:
                cells += [m["error"], "—"]
            elif m:
                cells += [f"{m['fwd_bwd_ms']:.2f}", f"{m['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}×"]
            print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
