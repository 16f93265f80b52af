"""End-to-end generation, side by side: hybrid-1.5b, mamba3-1.5b, mamba3-mimo-1.5b, transformer-1.5b.

    python benchmarks/generate.py [--only PATTERNS] [--json out.json] [--markdown out.md]
        [--models m1,m2] [--contexts 512,16384] [--variants fused,unfused,compiled]
    python benchmarks/generate.py --quick           # tiny presets on the CPU in seconds (a test runs it)
    python benchmarks/generate.py --report a.json b.json  # the tables of the rows of several calls
    python benchmarks/generate.py --op-count [--quick] # ops of one eager step, unfused vs fused (on CUDA also
                                                    # its kernels and their device time, the largest by name)
    TRITON_INTERPRET=1 python benchmarks/generate.py --quick --dtype bfloat16 --op-count --kernel-backend triton
                                                    # the same on the CPU, the GPU's kernels interpreted

Random weights (seed 0), bf16, greedy generation through ``hybridlm.Decoder`` (CUDA-graph steps,
chunked prefill), one process. Two kinds of case, each with an id that ``--only`` matches
(comma-separated ``fnmatch`` patterns, e.g. ``--only 'a:*'`` or ``--only 'b16384:transformer-1.5b:*'``):

* ``a:<model>:<variant>``: batch 1, a 2048-token prompt, 256 new tokens: ms per step and its
  ratio to the weight-read bound, (the model's parameter bytes) ÷ (the device copy bandwidth
  measured at the start of the same run).
* ``b<ctx>:<model>:<batch>:<variant>``: the paper's Table 7 shape, a ``ctx``-token prompt then
  ``ctx`` generated tokens: prefill s, decode s, generated tokens/s (batch × ctx ÷ decode s),
  peak memory. Every model runs at the largest batch the Transformer's KV cache fits
  (computed from the device's memory, see :func:`transformer_batch`); the state models also at
  batch 128, and the Transformer too where 128 fits. With ``--b-samples K`` (id suffix ``:sK``)
  the decode is sampled instead of run whole: ``SAMPLE_STEPS`` timed steps at K contexts spread
  evenly from the prompt to the last token (the cache filled with random tokens, as random weights
  generate: the prompt's prefill, then ``Decoder.extend`` on to each later context), and decode s is
  the sum over every generated token of ms/step interpolated linearly between them. A step's cost
  is affine in its context (the KV-cache read grows by one token a step; a Mamba-3 state does not
  grow), so the estimate is exact up to the timing noise and costs K·SAMPLE_STEPS steps instead of
  ``ctx``: the 16K Transformer row takes about a minute instead of eight.

Variants: ``fused`` (the Decoder's default: one fused add + RMSNorm kernel per block boundary and
one SwiGLU gate kernel; at decode sizes the boundary inside the next block's first GEMV kernel and
the KV-cache write with RoPE one kernel), ``unfused`` (the blocks' own norm ops, SwiGLU's silu and
mul, the torch cache write: the ops before issue 21), ``compiled`` (``fused`` with the step run through ``torch.compile`` inside the
captured graph). ``--json`` merges the rows into the file by case id, so calls that each stay
under a time limit fill one table; ``--skip-measured`` leaves out the cases the file already holds.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import fnmatch
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hybridlm.builder.inference.decoder import PREFILL_TOKENS, chunk_within
from hybridlm.builder.inference.generate import greedy
from hybridlm.kernels.decode_gemv.knobs import set_knobs

# The Transformer first: every (b) row's ratio is to it, so a run cut short by its time limit has it.
GPU_MODELS = ["transformer-1.5b", "hybrid-1.5b", "mamba3-1.5b", "mamba3-mimo-1.5b"]
QUICK_MODELS = ["transformer-tiny", "hybrid-tiny", "mamba3-tiny", "mamba3-mimo-tiny"]
TRANSFORMER_PREFIX = "transformer"
GIB = 2**30
SAMPLE_STEPS = 32  # timed steps at each context of a sampled decode (--b-samples)


@dataclass(frozen=True)
class Case:
    kind: str  # "a" (batch 1, ms per step) or "b" (Table 7)
    model: str
    batch: int
    prompt: int
    new_tokens: int
    variant: str
    batch_reason: str = ""
    samples: int = 0  # (b) only: the decode sampled at this many contexts (0: every step timed)

    @property
    def id(self) -> str:
        if self.kind == "a":
            return f"a:{self.model}:{self.variant}"
        return f"b{self.prompt}:{self.model}:{self.batch}:{self.variant}" + (f":s{self.samples}" if self.samples else "")


# -- measurements ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in bytes/s (read + write); 1 GiB buffers on CUDA, 64 MiB elsewhere."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    else:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[len(times) // 2] * 1e3
    return 2 * n * 4 / (ms * 1e-3)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters, a tied matrix once: what one decode step reads at least."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


# The blocks' own backend switches of the small fused inference ops (SwiGLU's gate, the decode GEMVs
# of SwiGLU and Mamba-3 with the block boundary's norm in front, attention's RoPE and its KV-cache
# write); the norms' switch is the Decoder's ``fused_norms``.
OP_BACKENDS = ("gate_backend", "gemv_backend", "rope_backend", "kv_backend")


@contextlib.contextmanager
def variant_kernels(model, variant: str):
    """``unfused``: every block op of OP_BACKENDS on the reference too (the plain torch ops before
    issue 21; the norms are the Decoder's ``fused_norms=False``). Other variants change nothing."""
    switched = [(m, attr) for m in model.modules() for attr in OP_BACKENDS
                if hasattr(m, attr)] if variant == "unfused" else []
    before = [getattr(m, attr) for m, attr in switched]
    for m, attr in switched:
        setattr(m, attr, "reference")
    try:
        yield
    finally:
        for (m, attr), backend in zip(switched, before):
            setattr(m, attr, backend)


def measure(model, case: Case, *, token_budget: int, seed: int = 0) -> dict:
    with variant_kernels(model, case.variant):
        return _measure(model, case, token_budget=token_budget, seed=seed)


def sample_starts(prompt: int, new_tokens: int, samples: int, steps: int = SAMPLE_STEPS) -> list[int]:
    """The contexts a sampled decode starts its timed steps at: ``samples`` of them, evenly from the
    prompt to the last window of ``steps`` steps that still fits in ``new_tokens``."""
    last = prompt + max(new_tokens - steps, 0)
    if samples < 2 or last == prompt:
        return [prompt]
    return sorted({round(prompt + i * (last - prompt) / (samples - 1)) for i in range(samples)})


def interpolated_decode_s(points: list[tuple[float, float]], prompt: int, new_tokens: int) -> float:
    """Seconds for steps at contexts prompt .. prompt + new_tokens - 1, each step's ms read off the
    line through the measured (context, ms) points (extended past the first and last)."""
    points = sorted(points)
    if len(points) == 1:
        return points[0][1] * new_tokens / 1e3

    def ms_at(x: float) -> float:
        i = 0  # the segment of x (the first or last one beyond the ends)
        while i < len(points) - 2 and points[i + 1][0] <= x:
            i += 1
        (x0, y0), (x1, y1) = points[i], points[i + 1]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    return sum(ms_at(prompt + t) for t in range(new_tokens)) / 1e3


def fill_to(decoder, context: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Random tokens into every row until it holds ``context`` tokens: the cache continued by
    ``Decoder.extend`` (only the tokens it lacks: at 16K the next samples' 24K and 32K contexts cost 8K
    tokens each instead of whole prefills), or a fresh prefill where it already holds more. The next
    greedy tokens."""
    held = decoder.lengths[0]
    shape = (decoder.batch_size, context - held if context > held else context)
    ids = torch.randint(0, vocab, shape, device=decoder.device, generator=generator)
    return greedy(decoder.extend(ids) if context > held else decoder.prefill(ids))


def timed_steps(decoder, tokens: torch.Tensor, steps: int, device: torch.device) -> tuple[torch.Tensor, float]:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):  # greedy as generate() runs it: the choice inside the step's graph, fed back
        tokens = decoder.step_greedy(None if decoder.greedy_fed else tokens)
    sync(device)
    return tokens, time.perf_counter() - t0


def _measure(model, case: Case, *, token_budget: int, seed: int = 0) -> dict:
    """Build a Decoder (graph capture untimed), warm the prefill path, then time one prefill of a
    random prompt and ``new_tokens`` greedy steps (hybridlm's greedy sampling included)."""
    from hybridlm.builder import Decoder

    device = model.tok_embeddings.weight.device
    chunk = chunk_within(case.batch, case.prompt, token_budget)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    decoder = Decoder(model, case.batch, case.prompt + case.new_tokens, prefill_chunk=chunk,
                      fused_norms=case.variant != "unfused", compile_step=case.variant == "compiled")
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.spec.vocab_size, (case.batch, case.prompt), device=device, generator=g)
    decoder.prefill(ids[:, : min(case.prompt, 2 * chunk)])  # compile both prefill paths
    sync(device)
    t0 = time.perf_counter()
    tokens = greedy(decoder.prefill(ids))
    sync(device)
    prefill_s = time.perf_counter() - t0
    sampled = {}
    if case.samples:
        points = []
        steps = min(SAMPLE_STEPS, case.new_tokens)
        for i, start in enumerate(sample_starts(case.prompt, case.new_tokens, case.samples, steps)):
            if i:  # fill the cache on to this context (random tokens, as the weights are random)
                tokens = fill_to(decoder, start, model.spec.vocab_size, g)
            tokens, seconds = timed_steps(decoder, tokens, steps, device)
            points.append((start + (steps - 1) / 2, seconds / steps * 1e3))
        decode_s = interpolated_decode_s(points, case.prompt, case.new_tokens)
        sampled = {"decode_sampled_ms_per_step": [[x, ms] for x, ms in points]}
    else:
        tokens, decode_s = timed_steps(decoder, tokens, case.new_tokens, device)
    row = {"prefill_chunk": decoder.prefill_chunk, "prefill_rows": decoder.prefill_rows, "prefill_s": prefill_s,
           "decode_s": decode_s, **sampled,
           "ms_per_step": decode_s / case.new_tokens * 1e3,
           "generated_tokens_per_s": case.batch * case.new_tokens / decode_s,
           "peak_memory_GiB": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
           "cuda_graph": decoder.uses_cuda_graph}
    del decoder
    return row


# Aten ops that launch no kernel (views, allocations, metadata) unless a copy runs under them.
NO_KERNEL_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::t", "aten::transpose",
    "aten::permute", "aten::expand", "aten::expand_as", "aten::as_strided", "aten::select", "aten::slice",
    "aten::unsqueeze", "aten::squeeze", "aten::unflatten", "aten::flatten", "aten::alias", "aten::detach",
    "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::split",
    "aten::split_with_sizes", "aten::narrow", "aten::unbind", "aten::chunk", "aten::view_as", "aten::to",
    "aten::contiguous", "aten::result_type", "aten::numpy_T", "aten::_has_compatible_shallow_copy_type",
    "aten::resolve_conj", "aten::resolve_neg", "aten::set_", "aten::is_nonzero",
}
STEP_KERNEL = "mamba3 step kernel"  # the profiler range around each Mamba-3 layer's step


def count_step_ops(model, variant: str, batch: int = 1, prompt: int = 8) -> dict:
    """Ops of one eager decode step (no graph) under torch.profiler, a proxy for the kernels the
    GPU launches: ``ops`` counts the aten and hybridlm ops Python calls directly (not those nested
    in another op) that are no view, allocation or no-op cast, and each Mamba-3 layer's step as one
    (the CuTe/Triton kernel on the GPU; its torch ops on the CPU are not counted); on CUDA
    ``kernels`` counts the device kernels launched."""
    from unittest import mock

    from hybridlm.builder import Decoder
    from hybridlm.kernels import dispatch

    device = model.tok_embeddings.weight.device
    decoder = Decoder(model, batch, prompt + 2, cuda_graph=False, fused_norms=variant != "unfused")
    tokens = decoder.prefill(torch.randint(0, model.spec.vocab_size, (batch, prompt), device=device)).argmax(-1)
    decoder.step(tokens)  # first-call work outside the profile
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step = dispatch.mamba3_decode_step

    def ranged_step(*args, **kwargs):  # the blocks call dispatch.mamba3_decode_step by attribute
        with torch.profiler.record_function(STEP_KERNEL):
            return step(*args, **kwargs)

    with variant_kernels(model, variant), mock.patch.object(dispatch, "mamba3_decode_step", ranged_step), \
            torch.profiler.profile(activities=activities) as prof:
        decoder.step(tokens)
        sync(device)
    events = prof.events()

    def counted(e) -> bool:
        return e.name.startswith(("aten::", "hybridlm::")) or e.name == STEP_KERNEL

    def nested(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if counted(parent):
                return True
            parent = parent.cpu_parent
        return False

    def copies(e) -> bool:
        return any(c.name in ("aten::copy_", "aten::_to_copy", "aten::clone") or copies(c) for c in e.cpu_children)

    ops = [e.name for e in events if counted(e) and not nested(e) and (e.name not in NO_KERNEL_OPS or copies(e))]
    row = {"ops": len(ops), "by_name": dict(sorted(collections.Counter(ops).items()))}
    if device.type == "cuda":  # where an eager step's device time goes (the graph removes the gaps)
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        by_kernel = collections.Counter()
        for e in kernels:
            by_kernel[e.name[:80]] += e.time_range.elapsed_us()
        row["kernels"] = len(kernels)
        row["kernel_us"] = round(sum(by_kernel.values()), 1)
        row["top_kernels_us"] = {name: round(us, 1) for name, us in by_kernel.most_common(12)}
    return row


def op_counts(args) -> list[dict]:
    from hybridlm.builder import build_model
    from hybridlm.layouts.presets import spec_or_preset

    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    rows = []
    for model_name in args.models:
        model = build_model(spec_or_preset(model_name), device=device, dtype=dtype, seed=0).eval()
        for m in model.modules():  # the GPU's kernels on the CPU (under TRITON_INTERPRET=1)
            if hasattr(m, "add_forward"):  # RMSNorm
                m.backend = args.kernel_backend
            for attr in OP_BACKENDS:  # SwiGLU's gate, attention's RoPE
                if hasattr(m, attr):
                    setattr(m, attr, args.kernel_backend)
        for variant in ("unfused", "fused"):
            row = {"model": model_name, "variant": variant, "device": str(device), **count_step_ops(model, variant)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
    return rows


# -- the plan -------------------------------------------------------------------------------------
def transformer_batch(model_name: str, context: int, dtype: torch.dtype, memory: int, reserve: int,
                      max_batch: int | None) -> tuple[int, str]:
    """The largest batch (a multiple of 8 where it is 8 or more) whose KV cache at ``2 * context``
    tokens fits next to the Transformer's weights: (memory - weights - reserve) ÷ KV bytes per sequence."""
    from hybridlm.builder import build_model
    from hybridlm.builder.model.accounting import decode_state_bytes
    from hybridlm.layouts.presets import spec_or_preset

    meta = build_model(spec_or_preset(model_name), device="meta", dtype=dtype)
    weights = weight_bytes(meta)
    per_sequence = decode_state_bytes(meta, 2 * context, dtype)
    batch = max(1, (memory - weights - reserve) // per_sequence)
    batch = batch - batch % 8 if batch >= 8 else batch
    reason = (f"{model_name}: ({memory / GIB:.1f} GiB - {weights / GIB:.2f} GiB weights - {reserve / GIB:.1f} GiB "
              f"reserve) / {per_sequence / 2**20:.1f} MiB KV cache per sequence of {2 * context} tokens")
    if max_batch is not None and batch > max_batch:
        batch, reason = max_batch, reason + f", capped at --max-batch {max_batch}"
    return int(batch), reason


def plan(args, dtype: torch.dtype, memory: int) -> list[Case]:
    transformers = [m for m in args.models if m.startswith(TRANSFORMER_PREFIX)]
    cases = []
    for variant in args.variants:
        for model in args.models:
            cases.append(Case("a", model, 1, args.a_prompt, args.a_new_tokens, variant))
        for ctx in args.contexts:
            new = args.b_new_tokens or ctx
            shared, reason = (transformer_batch(transformers[0], ctx, dtype, memory, args.reserve, args.max_batch)
                              if transformers else (args.state_batch, "no Transformer in --models"))
            for model in args.models:
                batches = [shared]
                # the state models' batch; the Transformer's too where its KV cache fits it
                fits = not model.startswith(TRANSFORMER_PREFIX) or args.state_batch <= shared
                if fits and args.state_batch not in batches:
                    batches.append(args.state_batch)
                for batch in batches:
                    why = reason if batch == shared else "the state models' batch (--state-batch)"
                    cases.append(Case("b", model, batch, ctx, new, variant, why, args.b_samples))
    return [c for c in cases if selected(c.id, args.only)]


def selected(case_id: str, only: list[str] | None) -> bool:
    return only is None or any(fnmatch.fnmatchcase(case_id, pattern) for pattern in only)


def run(args, on_row=None) -> dict:
    """Every planned case, one model in memory at a time; ``on_row(row)`` after each (the JSON file is
    written as rows come, so a call stopped by its time limit keeps the rows it measured)."""
    from hybridlm.builder import build_model
    from hybridlm.layouts.presets import spec_or_preset

    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    memory = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
              else int(args.cpu_memory_gib * GIB))
    cases = plan(args, dtype, memory)
    if args.skip_measured:
        done = measured_ids(args.json)
        skipped = [c.id for c in cases if c.id in done]
        if skipped:
            print(f"skipping {len(skipped)} case(s) already in {args.json}: {', '.join(skipped)}", flush=True)
        cases = [c for c in cases if c.id not in done]
    if args.dry_run:
        for case in cases:
            print(json.dumps({"id": case.id, "prefill_chunk": chunk_within(case.batch, case.prompt,
                                                                                 args.prefill_tokens),
                              "batch_reason": case.batch_reason}))
        return {"header": {}, "rows": []}
    bandwidth = copy_bandwidth(device)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype,
              "copy_bandwidth_TBps": bandwidth / 1e12, "command": args.command,
              "gemv_knobs": getattr(args, "gemv_knob_values", {}), "attention": os.environ.get("HYBRIDLM_ATTENTION", "auto")}
    print(json.dumps(header), flush=True)
    rows = []
    for model_name in dict.fromkeys(c.model for c in cases):  # one model in memory at a time
        model = build_model(spec_or_preset(model_name), device=device, dtype=dtype, seed=0).eval()
        weights = weight_bytes(model)
        for case in (c for c in cases if c.model == model_name):
            row = {"id": case.id, **asdict(case), **header, "weight_bytes": weights,
                   "weight_read_bound_ms": weights / bandwidth * 1e3}
            try:
                row.update(measure(model, case, token_budget=args.prefill_tokens))
                row["ratio_to_bound"] = row["ms_per_step"] / row["weight_read_bound_ms"]
            except Exception as e:  # keep measuring the others; the row says what failed
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            print(json.dumps(row), flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del model
        gc.collect()  # whatever an exception's traceback kept (a failed case's decoder) goes now
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"header": header, "rows": rows}


# -- output ---------------------------------------------------------------------------------------
def measured_ids(path: Path | None) -> set[str]:
    """Ids of the rows in ``path`` measured without an error (none if there is no such file)."""
    if path is None or not path.exists():
        return set()
    return {r["id"] for r in json.loads(path.read_text())["rows"] if "error" not in r}


def merge_json(path: Path, rows: list[dict]) -> list[dict]:
    """The file's rows with these replacing those of the same id; written back."""
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = {r["id"]: r for r in old}
    merged.update({r["id"]: r for r in rows})
    out = list(merged.values())
    path.write_text(json.dumps({"rows": out}, indent=1) + "\n")
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    """Table (a), then table (b), then where each row was measured."""
    lines = ["**(a) batch 1: a prompt, then new tokens; ms per step against the weight-read bound**", "",
             "| model | variant | prompt | new tokens | ms per step | weight-read bound ms | × bound | prefill s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "a"):
        lines.append(f"| {r['model']} | {r['variant']} | {r['prompt']} | {r['new_tokens']} | " + (
            f"error: {r['error']} | | | |" if "error" in r else
            f"{_fmt(r['ms_per_step'])} | {_fmt(r['weight_read_bound_ms'])} | {_fmt(r['ratio_to_bound'])} | "
            f"{_fmt(r['prefill_s'])} |"))
    lines += ["", "**(b) Table 7 shape: L-token prompt, then L generated tokens**", "",
              "| L | model | variant | batch | prefill s | decode s | generated tokens/s | ÷ Transformer's | "
              "peak memory GiB |", "|---|---|---|---|---|---|---|---|---|"]
    b_rows = [r for r in rows if r["kind"] == "b"]
    key = lambda r: (r["prompt"], r["batch"], r["variant"], r.get("samples", 0))  # noqa: E731
    transformer = {key(r): r.get("generated_tokens_per_s") for r in b_rows if r["model"].startswith(TRANSFORMER_PREFIX)}
    for r in sorted(b_rows, key=lambda r: (*key(r), r["model"])):
        base = transformer.get(key(r))
        ratio = r["generated_tokens_per_s"] / base if base and "error" not in r else None
        variant = r["variant"] + (f", decode sampled at {r['samples']} contexts" if r.get("samples") else "")
        lines.append(f"| {r['prompt']} | {r['model']} | {variant} | {r['batch']} | " + (
            f"error: {r['error']} | | | | |" if "error" in r else
            f"{_fmt(r['prefill_s'])} | {_fmt(r['decode_s'])} | {_fmt(r['generated_tokens_per_s'])} | "
            f"{_fmt(ratio)} | {_fmt(r['peak_memory_GiB'])} |"))
    reasons = sorted({f"L={r['prompt']}, batch {r['batch']}: {r['batch_reason']}" for r in rows
                      if r["kind"] == "b" and r["batch_reason"]})
    runs = sorted({f"{r['device']}, torch {r['torch']}, {r['date']}, copy bandwidth "
                   f"{r['copy_bandwidth_TBps']:.2f} TB/s: `{r['command']}`" for r in rows})
    lines += ["", "Batches: " + "; ".join(reasons), "", "Measured: " + "; ".join(runs)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    names = lambda s: s.split(",")  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny presets, fp32 on the CPU, short prompts, small batches: a check of the harness")
    p.add_argument("--only", type=names, default=None, help="case ids to run (fnmatch patterns, comma-separated)")
    p.add_argument("--models", type=names, default=None)
    p.add_argument("--variants", type=names, default=["fused"], help="fused, unfused, compiled")
    p.add_argument("--contexts", type=ints, default=None, help="Table 7 contexts L (default 512,16384)")
    p.add_argument("--a-prompt", type=int, default=None)
    p.add_argument("--a-new-tokens", type=int, default=None)
    p.add_argument("--b-new-tokens", type=int, default=None, help="generated tokens in (b) (default: L)")
    p.add_argument("--b-samples", type=int, default=0,
                   help="(b): time the decode at this many contexts and interpolate (0: time every step)")
    p.add_argument("--state-batch", type=int, default=None, help="the state models' extra batch (default 128)")
    p.add_argument("--max-batch", type=int, default=None, help="cap on the Transformer-fit batch")
    p.add_argument("--reserve-gib", type=float, default=None,
                   help="memory kept free of KV cache for weights' neighbours: activations, logits (default 12)")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="tokens per prefill forward (default: the Decoder's PREFILL_TOKENS, 131072)")
    p.add_argument("--cpu-memory-gib", type=float, default=1.0,
                   help="the memory the fit assumes on the CPU (--dry-run --device cpu --cpu-memory-gib 139.8: "
                        "an H200's plan)")
    p.add_argument("--dry-run", action="store_true", help="print the cases (ids, batches, prefill chunks) and exit")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and activations (default bfloat16; float32 with --quick)")
    p.add_argument("--json", type=Path, default=None, help="merge the rows into this file by case id")
    p.add_argument("--skip-measured", action="store_true",
                   help="leave out the cases --json already holds without an error: a run split over calls "
                        "(each bounded by a time limit) goes on where the last one stopped")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables of every row in --json (or this run)")
    p.add_argument("--report", type=Path, nargs="+", default=None,
                   help="print the tables of these JSON files (rows merged by case id, later files win) and exit")
    p.add_argument("--op-count", action="store_true",
                   help="count the ops (and CUDA kernels) of one eager step per model, unfused vs fused, and exit")
    p.add_argument("--gemv-knobs", default="",
                   help="decode GEMV knobs for every case, e.g. PDL=1,PREFETCH_L2=1 (hybridlm/kernels/decode_gemv/knobs.py)")
    p.add_argument("--attention", default=None,
                   help="the attention backend of every case (HYBRIDLM_ATTENTION: auto, fa4, triton, sdpa)")
    p.add_argument("--kernel-backend", default=None,
                   help="rmsnorm and swiglu_gate backend for --op-count (triton with TRITON_INTERPRET=1: the GPU's "
                        "path on a CPU)")
    args = p.parse_args(argv)
    if args.skip_measured and args.json is None:
        p.error("--skip-measured needs --json: the file whose rows are already measured")
    for variant in args.variants:
        if variant not in ("fused", "unfused", "compiled"):
            p.error(f"--variants: unknown variant {variant!r}; choose from fused, unfused, compiled")
    quick = args.quick
    defaults = dict(models=QUICK_MODELS if quick else GPU_MODELS, contexts=[16, 32] if quick else [512, 16384],
                    a_prompt=24 if quick else 2048, a_new_tokens=8 if quick else 256, state_batch=4 if quick else 128,
                    max_batch=6 if quick else None, reserve_gib=0.0 if quick else 12.0,
                    prefill_tokens=48 if quick else PREFILL_TOKENS, device="cpu" if quick else "cuda")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = args.dtype or ("float32" if quick else "bfloat16")
    args.reserve = int(args.reserve_gib * GIB)
    args.command = "python benchmarks/generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    try:
        args.gemv_knob_values = set_knobs(args.gemv_knobs)[0]
    except ValueError as e:
        raise SystemExit(f"--gemv-knobs: {e}")
    if args.attention:
        os.environ["HYBRIDLM_ATTENTION"] = args.attention  # read by the registry at each choice
    if args.report:
        rows = {r["id"]: r for path in args.report for r in json.loads(path.read_text())["rows"]}
        print(markdown(list(rows.values())), end="")
        return None
    if args.op_count:
        rows = op_counts(args)
        if args.json:
            args.json.write_text(json.dumps({"op_counts": rows}, indent=1) + "\n")
        return {"op_counts": rows}
    result = run(args, on_row=(lambda row: merge_json(args.json, [row])) if args.json else None)
    if args.dry_run:
        return result
    rows = merge_json(args.json, result["rows"]) if args.json else result["rows"]
    table = markdown(rows)
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table)
    return result


if __name__ == "__main__":
    main()
