"""The GPU call scripts (benchmarks/gpu/*.sh) hold no mistake that would cost device time: each parses
as bash, every file it names exists, and every option it passes to a benchmark script is one that
script's --help lists."""
from __future__ import annotations

import json
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


def _mps_call(tmp_path: Path, check: str | None, with_control: bool = True) -> tuple[str, list[str]]:
    """benchmarks/gpu/mps.sh's start_mps in a shell, with a stand-in nvidia-cuda-mps-control that logs
    its calls; returns what the shell printed and the stand-in's log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "control.log"
    bin_dir.mkdir(exist_ok=True)
    if with_control:
        control = bin_dir / "nvidia-cuda-mps-control"
        control.write_text(f'#!/bin/sh\nif [ "$#" -gt 0 ]; then echo "$*" >> {log}; else cat >> {log}; fi\n')
        control.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path), "MPS": "1", "MPS_HOME": str(tmp_path / "mps")}
    if check is not None:
        env["MPS_CHECK"] = check
    script = 'source benchmarks/gpu/mps.sh; start_mps; echo "pipe=${CUDA_MPS_PIPE_DIRECTORY:-none}"'
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, log.read_text().split() if log.exists() else []


def test_mps_server_starts_and_stops_at_exit(tmp_path):
    out, calls = _mps_call(tmp_path, "true")
    assert "MPS server up" in out and f"pipe={tmp_path}/mps/pipe" in out
    assert calls == ["-d", "quit"]  # started, then quit by the EXIT trap


def test_mps_server_that_serves_no_context_is_stopped_and_the_call_goes_on(tmp_path):
    out, calls = _mps_call(tmp_path, "false")
    assert "running without MPS" in out and "pipe=none" in out and calls == ["-d", "quit"]


def test_mps_without_its_control_program_runs_without(tmp_path):
    if any((Path(d) / "nvidia-cuda-mps-control").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("this machine has the real nvidia-cuda-mps-control")
    out, calls = _mps_call(tmp_path, "true", with_control=False)
    assert "not on PATH" in out and "pipe=none" in out and calls == []


def test_mps_default_check_runs_python_with_its_code_intact(tmp_path):
    """The default check command keeps its quotes (2026-12-04 it lost them, failed on a bash syntax error and
    ran the call without MPS): a stand-in python3 sees `-c` and the whole program as one argument."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "python-args"
    python = bin_dir / "python3"
    python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}\n')
    python.chmod(0o755)
    out, calls = _mps_call(tmp_path, None)
    assert "MPS server up" in out and calls == ["-d", "quit"]
    assert seen.read_text().splitlines() == ["-c", 'import torch; torch.ones(1, device="cuda").sum().item()']


def test_call_outputs_stay_within_eight_files(tmp_path):
    """A call brings back at most 8 files from $OUT (the device tool drops the rest: 2026-12-04 a run folder's
    archive was dropped that way): common.sh's tidy_out packs all but the files it is told to keep."""
    out = tmp_path / "out"
    (out / "mps-log").mkdir(parents=True)
    for name in ["study.log", "a.txt", "b.txt", "c.log", "d.txt", "e.txt", "f.txt", "mps-log/server.log",
                 "st-paper.tgz.part-aa", "st-paper.tgz.part-ab"]:
        (out / name).write_text(name)
    # the function alone: common.sh itself sources the GPU machine's set-up
    script = 'eval "$(sed -n \'/^tidy_out()/,/^}/p\' benchmarks/gpu/common.sh)"; tidy_out study.log "st-paper.tgz.part-*"'
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env={"OUT": str(out), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    left = sorted(p.name for p in out.iterdir())
    assert left == ["logs.tgz", "st-paper.tgz.part-aa", "st-paper.tgz.part-ab", "study.log"]
    listed = subprocess.run(["tar", "tzf", str(out / "logs.tgz")], capture_output=True, text=True).stdout.split()
    assert {"a.txt", "f.txt", "mps-log/server.log"} <= set(listed)
    # a second script of the same call adds to the archive (2026-12-05 it replaced it, and a recorded file with it)
    (out / "g.txt").write_text("g")
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env={"OUT": str(out), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    listed = subprocess.run(["tar", "tzf", str(out / "logs.tgz")], capture_output=True, text=True).stdout.split()
    assert {"a.txt", "g.txt", "mps-log/server.log"} <= set(listed)
    assert sorted(p.name for p in out.iterdir()) == left


def test_measured_errors_merge_across_xdist_workers(tmp_path, monkeypatch):
    """The GPU tests run under pytest -n (common.sh's PYTEST_PARALLEL): each worker's write_results merges its
    rows into the same run's file, nested tables key by key; a file left by another run is replaced, and
    without xdist the module's results are written whole."""
    from hybridlm.testing import write_results

    path = tmp_path / "errors.json"
    monkeypatch.setenv("HYBRIDLM_RESULTS_X", str(path))
    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", "run-1")
    write_results("HYBRIDLM_RESULTS_X", {"fp32": {"a": 1.0}, "packed": 2.0})
    write_results("HYBRIDLM_RESULTS_X", {"fp32": {"b": 3.0}})
    assert json.loads(path.read_text()) == {"fp32": {"a": 1.0, "b": 3.0}, "packed": 2.0, "_xdist_run": "run-1"}
    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", "run-2")
    write_results("HYBRIDLM_RESULTS_X", {"fp32": {"c": 4.0}})
    assert json.loads(path.read_text()) == {"fp32": {"c": 4.0}, "_xdist_run": "run-2"}
    monkeypatch.delenv("PYTEST_XDIST_TESTRUNUID")
    write_results("HYBRIDLM_RESULTS_X", {"fp32": {"d": 5.0}})
    assert json.loads(path.read_text()) == {"fp32": {"d": 5.0}}
