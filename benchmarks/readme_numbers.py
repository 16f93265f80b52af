"""Re-measure the README's CPU numbers on this machine, as a new user would see them.

    python benchmarks/readme_numbers.py                 # presets, the CPU walkthrough, study --quick
    python benchmarks/readme_numbers.py --tests --demo  # also `make test` and `make demo` (minutes each)

Each check prints what the README states it against, the command, and its wall time, with the
machine's core count and load before it starts (numbers measured under load are upper bounds).
GPU numbers in the README come from `benchmarks/titan_throughput.py` and `benchmarks/decode.py`
(see docs/benchmarks.md for their commands); this script does not touch them.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STUDIES = ("state-tracking", "out-norm", "discretization")
WALKTHROUGH_TASK = "niah-1:template=short:digits=1"  # the README walkthrough's eval = cpu-debug.toml's data


def run(cmd: list[str], label: str, keep: int = 6) -> tuple[float, str]:
    """Run ``cmd`` from the repository root; print its last lines and wall time."""
    print(f"\n## {label}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = (proc.stdout + proc.stderr).strip()
    for line in out.splitlines()[-keep:]:
        print(f"  {line}")
    print(f"  -> exit {proc.returncode}, {seconds:.0f} s", flush=True)
    return seconds, out


def hybridlm(*args: str) -> list[str]:
    return [str(BIN / "hybridlm"), *args]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tests", action="store_true", help="also time `make test` (the README's test count and time)")
    p.add_argument("--demo", action="store_true", help="also time `make demo` (the README's demo table and time)")
    p.add_argument("--no-studies", action="store_true", help="skip `hybridlm study NAME --quick`")
    args = p.parse_args()
    print(f"# README numbers, {date.today()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"python {sys.version.split()[0]}")

    run(hybridlm("presets"), "every preset's size (README: Presets table)", keep=20)
    run(hybridlm("show", "mamba3-1.5b", "--summary"), "README: Command line, `show mamba3-1.5b`", keep=3)

    work = ROOT / "runs" / "readme-numbers"
    shutil.rmtree(work, ignore_errors=True)
    run(hybridlm("train", "specs/tiny-hybrid.yaml", "--job.dump_folder", str(work / "train")),
        "the CPU walkthrough: train (README: Training, the three output lines)", keep=4)
    run(hybridlm("export", str(work / "train"), "--out", str(work / "model")), "export", keep=2)
    run(hybridlm("eval", str(work / "model"), "--task", WALKTHROUGH_TASK, "--lengths", "1x,2x,4x,8x",
                 "--out", str(work / "eval")), "eval of the walkthrough model (README: Training)", keep=7)

    if not args.no_studies:
        for study in STUDIES:
            run(hybridlm("study", study, "--quick", "--out", str(work / f"study-{study}")),
                f"study {study} --quick (README: Reproducing the paper, '--quick')", keep=3)
    if args.tests:
        _, out = run(["make", "test"], "make test (README: Tests, count and time)", keep=2)
        match = re.search(r"(\d+) passed.*?(\d+) skipped", out)
        if match:
            print(f"  tests: {match.group(1)} passed, {match.group(2)} skipped")
    if args.demo:
        run(["make", "demo"], "make demo (README: The demo, table and time)", keep=12)


if __name__ == "__main__":
    main()
