"""The GPU call scripts (benchmarks/gpu/*.sh) hold no mistake that would cost device time: each parses
as bash, every file it names exists, and every option it passes to a benchmark script is one that
script's --help lists."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks" / "gpu").glob("*.sh"))
# a benchmark script or a hybridlm subcommand, then its arguments up to a pipe or a redirection
CALL = re.compile(r"python3 (benchmarks/\w+\.py|-m hybridlm \w+)((?:\s+(?!\||2>)\S+)*)")
PATHS = re.compile(r"\b((?:tests|benchmarks|specs)/[\w./-]+\.(?:py|sh|json|toml|yaml))\b")


def script_text(path: Path) -> str:
    return path.read_text().replace("\\\n", " ")  # continued lines as one


def test_there_are_gpu_scripts():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "inference.sh", "prefill.sh", "state_tracking.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_names_existing_files(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    written = {"benchmarks/peer_autotune_h200.json"}  # written by the --tune call itself
    missing = [p for p in PATHS.findall(script_text(script)) if not (REPO / p).exists() and p not in written]
    assert not missing, f"{script.name} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_only_options_the_benchmarks_know(script):
    for target, args in CALL.findall(script_text(script)):
        options = set(re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", args))
        if not options:
            continue
        command = ([sys.executable, *target.split()[:1], "hybridlm", *target.split()[2:]] if target.startswith("-m")
                   else [sys.executable, str(REPO / target)])
        help_text = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120).stdout
        unknown = sorted(o for o in options if o not in help_text)
        assert not unknown, f"{script.name}: {target} does not take {unknown}"
