"""Compile the CuTe Mamba-3 decode step for sm_90a without a GPU and report ptxas registers/spills.

    CUTE_DSL_ARCH=sm_90a python3 benchmarks/cute_report.py [--d-state 64,128] [--rank 1,4]
        [--headdim 64] [--nheads 64] [--ptxas PATH] [--probe no-rank-terms]

The knobs of KernelTuning come from the environment as everywhere (HYBRIDLM_CUTE_MAX_ROWS=2, ...). Each line
gives ptxas's registers and spills and the kernel's SASS instructions (static count and the top opcodes).

Needs nvidia-cutlass-dsl 4.8.1 (its CUDA-13 libraries from .gpu-cute unpacked into site-packages),
apache-tvm-ffi and torch (no GPU: the configuration comes from the host code,
``hybridlm.kernels.mamba3.cute.kernel_config``, as in a real step). ``ptxas`` comes from ``--ptxas`` or the
``nvidia-cuda-nvcc`` wheel (CUDA 13: the DSL's PTX is version 9.x, which older ptxas refuse).
Compile errors show up here in seconds instead of on the GPU machine.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

# the project from this checkout: the Python 3.12 venv this runs in does not install it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def find_ptxas(given: str | None) -> str | None:
    if given:
        return given
    import site

    for root in site.getsitepackages():
        hits = glob.glob(os.path.join(root, "nvidia", "cu13", "bin", "ptxas"))
        if hits:
            return hits[0]
    return None


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-state", type=ints, default=[64, 128])
    p.add_argument("--rank", type=ints, default=[1, 4])
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--nheads", type=int, default=64)
    p.add_argument("--out-mode", type=int, default=0, help="0 none, 1 pre-gate grouped, 2 post-gate grouped")
    p.add_argument("--ptxas", default=None)
    p.add_argument("--probe", default=None, help="compile benchmarks/cute_step_probe.py's probe of this name instead "
                   "(no-gamma-terms, no-rank-terms, no-readout, state-only): its registers beside the step's")
    args = p.parse_args()
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    dump = tempfile.mkdtemp(prefix="cute-ptx-")
    os.environ.update(CUTE_DSL_KEEP_PTX="1", CUTE_DSL_DUMP_DIR=dump)
    import torch
    from cutlass.cutlass_dsl import cutlass as dsl

    from hybridlm.kernels.mamba3 import cute
    from hybridlm.kernels.mamba3.contract import DecodeLayout
    from hybridlm.kernels.mamba3.cute import step
    from kernel_report import sass_counts  # benchmarks/ is on the path when this script runs

    # a launch with min_blocks_per_mp asks the driver for the SM's shared memory: answer for sm_90
    dsl.cuda_helpers.get_device_attribute = lambda *a, **k: 233472

    ptxas = find_ptxas(args.ptxas)
    if args.probe:
        from cute_step_probe import probe_class  # benchmarks/, beside this script

        step.Mamba3DecodeStep = probe_class(step.Mamba3DecodeStep, args.probe)
    for rank in args.rank:
        for N in args.d_state:
            before = set(glob.glob(os.path.join(dump, "*.ptx")))
            out_norm = ("none", "pregate_grouped", "postgate_grouped")[args.out_mode]
            layout = DecodeLayout(nheads=args.nheads, headdim=args.headdim, ngroups=1, rank=rank, d_state=N,
                                  n_angles=N // 4, out_norm=out_norm,
                                  pair_layout="interleaved" if rank == 1 else "half")
            config = cute.kernel_config(layout, torch.bfloat16, torch.bfloat16)
            if isinstance(config, str):
                print(f"R={rank} d_state={N} headdim={args.headdim}: {config}")
                continue
            op = cute.build_op(config, has_mimo=rank > 1)
            step.compile_step(op, proj_dtype="BFloat16", kv_dtype="BFloat16", norm_dtype="BFloat16",
                              has_bias=True, has_norm=args.out_mode in (1, 2))
            new = sorted(set(glob.glob(os.path.join(dump, "*.ptx"))) - before)
            report = "ptxas not found"
            if ptxas and new:
                cubin = new[-1][:-len(".ptx")] + ".cubin"
                out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", new[-1], "-o", cubin],
                                     capture_output=True, text=True).stderr
                report = " ".join(line.split("info    :")[-1].strip() for line in out.splitlines()
                                  if "registers" in line or "spill" in line)
                if os.path.exists(cubin):
                    with open(cubin, "rb") as f:
                        report += "; " + sass_counts(f.read())
            print(f"R={rank} d_state={N} headdim={args.headdim}: {op.threads} threads, {op.rows} rows a thread; "
                  f"{report}" + (f" ({new[-1]})" if new else ""))


if __name__ == "__main__":
    main()
