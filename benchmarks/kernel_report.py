"""Registers, spills and shared memory of our Triton kernels for Hopper, without a GPU.

    python benchmarks/kernel_report.py [--d-state 128] [--headdim 64] [--rank 1] [--dtype bf16] [--out-norm none]
    python benchmarks/kernel_report.py --decode-gemv [--dtype bf16]   # the decode GEMV kernel's forms
    python benchmarks/kernel_report.py --decode-attention [--dtype bf16]  # the decode attention kernel
    python benchmarks/kernel_report.py --greedy [--dtype bf16]        # the greedy (argmax) kernel
    python benchmarks/kernel_report.py --sass [TRIPS] [--d-state 64]  # also SASS instruction counts
    python benchmarks/kernel_report.py --peer-dqkv DIR --sass [--d-state 64]  # the official backward's main kernel

Runs one scan's launches with a capturing stub instead of the GPU, compiles each kernel for
sm_90 with Triton's own toolchain (ptxas ships with Triton), and prints ptxas's resource line.
Device time is scarce; this answers "does it spill?" for free. The tuning knobs come from the
environment as in any run, e.g. HYBRIDLM_TRITON_BACKWARD_KERNELS=2 for the split backward kernels.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64", torch.bool: "i1"}
_captured: list = []


def _capture(self, *args, grid, warmup, **kwargs):
    _captured.append((self, args, kwargs))


def launches(run) -> list:
    """The kernel launches ``run()`` makes, captured instead of executed."""
    original = JITFunction.run
    JITFunction.run = _capture
    try:
        _captured.clear()
        run()
    finally:
        JITFunction.run = original
    return list(_captured)


def sass_counts(cubin: bytes, loop_trips: int = 1) -> str:
    """SASS instructions of a cubin (cuobjdump ships with Triton): the static total, the sizes of
    its loops (a backward branch closes one), the total with every loop body counted
    ``loop_trips`` times (what one program runs when each loop turns that often: for the chunk
    kernels, d_state / 2 / pair block / 2 with rope_fraction 0.5, since rotated and unrotated blocks
    are two loops), and the most frequent opcodes. The scan's kernels are issue-bound (ncu), so the
    weighted count, times warps and programs, predicts their time: 344 M against ncu's 341 M for the
    backward chunk kernel at B 8, L 2K, d_state 64 (docs/benchmarks.md)."""
    import collections

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    code = []  # (address, opcode, rest of the line)
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*)", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []
    for address, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    ops, weighted = collections.Counter(), 0
    for address, op, _ in code:
        ops[op] += 1
        weighted += loop_trips if any(lo <= address <= hi for lo, hi in loops) else 1
    sizes = "/".join(str(sum(lo <= a <= hi for a, _, _ in code)) for lo, hi in loops) or "none"
    top = " ".join(f"{op} {n}" for op, n in ops.most_common(5))
    return f"sass {len(code)}, loops {sizes}, at {loop_trips} trips {weighted} ({top})"


def resource_line(fn: JITFunction, args: tuple, kwargs: dict, arch: int = 90, sass: int = 0) -> str:
    num_warps = kwargs.pop("num_warps", 4)
    num_stages = kwargs.pop("num_stages", 3)
    maxnreg = kwargs.pop("maxnreg", None)
    bound = dict(zip(fn.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = bound[name]
        # the JIT's own specialization: 16-aligned pointers and ints divisible by 16 are marked so,
        # which is what lets Triton vectorize loads and stores
        if (torch.is_tensor(value) and value.data_ptr() % 16 == 0) or (
                type(value) is int and value % 16 == 0 and i not in fn.constexprs):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if i in fn.constexprs:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif torch.is_tensor(value):
            signature[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    src = ASTSource(fn, signature, constexprs, attrs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages,
                                                                   **({"maxnreg": maxnreg} if maxnreg else {})))
    # ptxas as Triton runs it (same flags), for its resource and spill report
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    if not regs:
        raise SystemExit(f"ptxas failed on {fn.__name__}:\n{out[-2000:]}")
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return (f"{fn.__name__:28s} warps {num_warps} regs {regs.group(1) if regs else '?':>4s} "
            f"stack {stack.group(1) if stack else '?':>6s} spill st/ld {spill.group(1) if spill else '?'}/"
            f"{spill.group(2) if spill else '?'}  "
            f"smem {compiled.metadata.shared}" + (f"  {sass_counts(compiled.asm['cubin'], sass)}" if sass else ""))


def scan_launches(d_state: int, headdim: int, rank: int, dtype: torch.dtype, seqlen: int = 256,
                  out_norm: str = "none") -> list:
    from hybridlm.kernels.mamba3.triton import inputs
    from hybridlm.kernels.mamba3.triton import scan as scan_module
    from hybridlm.testing import scan_kwargs

    original_check = scan_module.unsupported_reason
    scan_module.unsupported_reason = lambda *a: None  # CPU tensors: the stub runs nothing
    try:
        H, G, S = 16, 1, d_state // 4  # sizes divisible by 16, as in real models (the JIT specializes on it)
        q = torch.randn(1, seqlen, rank, G, d_state, dtype=dtype)
        k = torch.randn_like(q)
        x = torch.randn(1, seqlen, H, headdim, dtype=dtype)
        dt = torch.rand(1, seqlen, H) * 0.1
        kw = dict(q_bias=torch.randn(H, rank, d_state), k_bias=torch.randn(H, rank, d_state), D=torch.randn(H),
                  pair_layout="interleaved" if rank == 1 else "half", out_norm=out_norm)
        if out_norm != "none":
            kw["norm_weight"] = torch.rand(H * headdim)
        if rank > 1:
            kw.update(mimo_x=torch.randn(H, rank, headdim), mimo_z=torch.randn(H, rank, headdim),
                      mimo_o=torch.randn(H, rank, headdim))
        angle_rate = torch.randn(1, seqlen, S)  # a leaf as in training: its backward kernel is compiled too
        leaves = [t.requires_grad_() for t in (q, k, x, angle_rate)]
        # the per-token inputs from in_proj's B, C, dt, A and trap columns (one projection row, as the module's)
        W = rank * G * d_state
        proj = torch.randn(1, seqlen, 2 * W + 3 * H, dtype=dtype, requires_grad=True)
        segments = torch.split(proj, [W, W, H, H, H], dim=-1)
        norms = [torch.ones(d_state, dtype=dtype, requires_grad=True) for _ in range(2)]
        dt_bias = torch.zeros(H, requires_grad=True)

        def run():
            out = scan_module.mamba3_chunked(*leaves[:3], dt, -dt, torch.rand(1, seqlen, H), leaves[3],
                                             z=torch.randn_like(x), **scan_kwargs(kw))
            out.float().sum().backward()  # the stubs leave garbage, but the backward launches are captured
            made = inputs.mamba3_inputs(*segments, dt_bias, *norms, rank=rank, a_activation="heavy_tail",
                                        A_floor=1e-4, discretization="trapezoid", b_eps=1e-5, c_eps=1e-5)
            sum(t.float().sum() for t in made).backward()

        return launches(run)
    finally:
        scan_module.unsupported_reason = original_check


def decode_gemv_launches(dtype: torch.dtype) -> list:
    """The decode GEMV kernel's forms (silu_mul_gemv, norm_gemv gated, plain, and stacked as q, k, v)
    at the 1.5B presets' shapes (d_model 2048, hidden 4096; q 2048, k and v 512 rows) at 1, 8 and 16
    rows, on CUDA cores and then on tensor cores; then split-K (4) on tensor cores; then the one-row
    CUDA-core form (gated and plain); then PREFETCH_L2 and PDL on the tensor-core form (the Hopper
    instructions through ptxas: griddepcontrol, cp.async.bulk.prefetch.L2); then the one-row default
    with PDL (gated, plain) and its first tile before the wait (PRELOAD_TILES 1), then all four
    (PRELOAD_TILES 4)."""
    from hybridlm.kernels.decode_gemv import triton as kernel

    def run():
        for (kernel.TENSOR_CORES, kernel.SPLIT_K), rows in itertools.product(((False, 1), (True, 1), (True, 4)),
                                                                             (1, 8, 16)):
            h, residual = torch.randn(rows, 2048, dtype=dtype), torch.randn(rows, 2048, dtype=dtype)
            g, w1, w3 = torch.rand(2048, dtype=dtype), *(torch.randn(4096, 2048, dtype=dtype) for _ in range(2))
            kernel.silu_mul_gemv(h, w1, w3)
            kernel.norm_gemv(h, residual, g, 1e-5, w1, w3)
            kernel.norm_gemv(h, residual, g, 1e-5, w1)
            kernel.norm_gemv(h, residual, g, 1e-5, w1[:2048], stacked=(w1[:512], w3[:512]))
        kernel.CUDA_CORES_AT_ONE_ROW = True  # the one-row CUDA-core form at its default blocks
        kernel.TENSOR_CORES, kernel.SPLIT_K = default["TENSOR_CORES"], default["SPLIT_K"]  # as the loop left them
        h, residual = torch.randn(1, 2048, dtype=dtype), torch.randn(1, 2048, dtype=dtype)
        g, w1, w3 = torch.rand(2048, dtype=dtype), *(torch.randn(4096, 2048, dtype=dtype) for _ in range(2))
        kernel.norm_gemv(h, residual, g, 1e-5, w1, w3)
        kernel.norm_gemv(h, residual, g, 1e-5, w1)
        kernel.CUDA_CORES_AT_ONE_ROW, kernel.PREFETCH_L2, kernel.PDL = False, True, True
        kernel.pdl_usable = lambda device: True  # CPU tensors: the stub runs nothing
        kernel.norm_gemv(h, residual, g, 1e-5, w1, w3)
        kernel.norm_gemv(h, residual, g, 1e-5, w1[:2048], stacked=(w1[:512], w3[:512]))
        kernel.gemv(h, w1)
        kernel.CUDA_CORES_AT_ONE_ROW, kernel.PREFETCH_L2 = True, False  # the defaults at one row: PDL, CUDA cores,
        kernel.PRELOAD_TILES = 1  # the first tile before the wait
        kernel.norm_gemv(h, residual, g, 1e-5, w1, w3)
        kernel.gemv(h, w1)
        kernel.PRELOAD_TILES = 4  # and with all four of a program's weight tiles loaded before the wait
        kernel.norm_gemv(h, residual, g, 1e-5, w1, w3)
        kernel.gemv(h, w1)
        kernel.PRELOAD_TILES = default["PRELOAD_TILES"]

    names = "TENSOR_CORES", "SPLIT_K", "CUDA_CORES_AT_ONE_ROW", "PREFETCH_L2", "PDL", "PRELOAD_TILES", "pdl_usable"
    default = {name: getattr(kernel, name) for name in names}
    try:
        return launches(run)
    finally:
        for name, value in default.items():
            setattr(kernel, name, value)


def decode_attention_launches(dtype: torch.dtype) -> list:
    """The decode attention kernel at the 1.5B presets' heads (16 q, 4 kv, head_dim 128), batch 1 and
    80, with and without a window."""
    from hybridlm.kernels.decode_attention import triton as kernel

    check = kernel.unsupported_reason
    def run():
        for batch, window in ((1, None), (80, None), (1, 512)):
            q = torch.randn(batch, 1, 16, 128, dtype=dtype)
            k, v = (torch.randn(batch, 2304, 4, 128, dtype=dtype) for _ in range(2))
            kernel.decode_attention(q, k, v, torch.full((batch,), 2000, dtype=torch.int32), window=window)
        kernel.PDL, kernel.pdl_usable = True, lambda device: True  # with PDL (griddepcontrol through ptxas)
        kernel.decode_attention(q, k, v, torch.full((batch,), 2000, dtype=torch.int32))

    default = kernel.PDL, kernel.pdl_usable
    try:
        return launches(run)
    finally:
        kernel.unsupported_reason = check
        kernel.PDL, kernel.pdl_usable = default


def greedy_launches(dtype: torch.dtype) -> list:
    """The greedy kernel at the 1.5B presets' vocabulary (128,256 logits a row)."""
    from hybridlm.kernels.greedy import triton as kernel

    return launches(lambda: kernel.argmax(torch.randn(2, 128256, dtype=dtype)))


def peer_dqkv_launch(source: str, d_state: int) -> tuple:
    """The official SISO backward's main kernel (``mamba3_siso_bwd_kernel_dqkv``: one program per (sequence,
    head) walking its chunks in reverse), from the mamba_ssm source tree ``source`` (the staged peer, unpacked),
    with the configuration its autotune chose on the H200 (benchmarks/peer_autotune_h200.json) at d_state 64 or
    128: (kernel, args, kwargs) for :func:`resource_line`. Its package ``__init__`` files import CUDA
    extensions, so only its Triton modules are loaded."""
    import importlib
    import inspect
    import json
    import sys
    import types

    root = os.path.join(source, "mamba_ssm")
    for name in ("", ".ops", ".ops.triton", ".ops.triton.mamba3"):
        package = types.ModuleType("mamba_ssm" + name)
        package.__path__ = [os.path.join(root, *name.split(".")[1:])]
        sys.modules.setdefault("mamba_ssm" + name, package)
    bwd = importlib.import_module("mamba_ssm.ops.triton.mamba3.mamba3_siso_bwd")
    # its launcher asserts CUDA tensors; the same function without the check, for the capturing stub
    launcher = "\n".join(line for line in inspect.getsource(bwd.compute_dqkv).splitlines() if "is_cuda" not in line)
    exec(launcher, bwd.__dict__)
    chosen = json.load(open(os.path.join(os.path.dirname(__file__), "peer_autotune_h200.json")))
    configs = chosen["mamba_ssm.ops.triton.mamba3.mamba3_siso_bwd.mamba3_siso_bwd_kernel_dqkv"]
    config = next(c for key, c in configs.items() if key.startswith(f"(64, {d_state}, 64,"))
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"],
                   **({"maxnreg": config["maxnreg"]} if config["maxnreg"] else {}))
    bwd.mamba3_siso_bwd_kernel_dqkv.configs = [triton.Config({}, **options)]
    B, L, H, P, C = 2, 256, 16, 64, 64
    bf16 = torch.bfloat16
    q = torch.randn(B, L, H, d_state, dtype=bf16)
    v = torch.randn(B, L, H, P, dtype=bf16)
    da_cs = torch.randn(B, H, L)
    states = torch.randn(B, H, P, L // C * d_state, dtype=bf16)
    (fn, args, kwargs), = launches(lambda: bwd.compute_dqkv(q, q.clone(), v, da_cs, torch.randn(B, H, L // C),
                                                              da_cs.clone(), states, v.clone(), D=torch.randn(H),
                                                              chunk_size=C))
    # the JIT's specialization of integer arguments equal to 1 (its TMA descriptors need a constant unit stride)
    fn.constexprs = sorted(set(fn.constexprs) | {i for i, a in enumerate(args) if type(a) is int and a == 1})
    return fn, args, dict(kwargs) | options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--out-norm", default="none", choices=["none", "pregate_grouped", "postgate_grouped"],
                        help="the scan's output norm (the hybrid presets: pregate_grouped)")
    parser.add_argument("--decode-gemv", action="store_true", help="the decode GEMV kernel instead of the scan's")
    parser.add_argument("--decode-attention", action="store_true", help="the decode attention kernel instead")
    parser.add_argument("--greedy", action="store_true", help="the greedy (argmax) kernel instead")
    parser.add_argument("--peer-dqkv", metavar="MAMBA_SSM_SOURCE",
                        help="the official backward's dqkv kernel from this unpacked mamba_ssm source instead "
                             "(.gpu/peer/mamba_ssm-*.tar.gz), at its H200 autotune choice and --d-state")
    parser.add_argument("--sass", type=int, nargs="?", const=1, default=0, metavar="LOOP_TRIPS",
                        help="also count each kernel's SASS instructions, loop bodies counted LOOP_TRIPS times")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.peer_dqkv:
        found = [peer_dqkv_launch(args.peer_dqkv, args.d_state)]
    else:
        found = (decode_gemv_launches(dtype) if args.decode_gemv else decode_attention_launches(dtype)
                 if args.decode_attention else greedy_launches(dtype) if args.greedy else scan_launches(args.d_state, args.headdim, args.rank, dtype,
                                                             out_norm=args.out_norm))
    for fn, a, kw in found:
        print(resource_line(fn, a, dict(kw), sass=args.sass))


if __name__ == "__main__":
    main()
