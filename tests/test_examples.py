"""Every script in examples/ runs at its tiny size, as a user would run it."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--tiny", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_build_and_account():
    out = run_example("build_and_account.py")
    assert "name: my-hybrid" in out and "train FLOPs/token" in out
    assert "logits (2, 32, 256), finite: True" in out


def test_custom_block_trains():
    out = run_example("custom_block.py")
    assert "gconv" in out  # the accounting table lists the new kind
    losses = [float(line.split("loss")[1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_eval_two_models():
    out = run_example("eval_two_models.py")
    assert "hybrid-tiny" in out and "transformer-tiny" in out and "@8x" in out and "(chance %)" in out


def test_train_text_and_generate(tmp_path):
    out = run_example("train_text_and_generate.py", "--work", str(tmp_path))
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert "trained 4 steps at length 64" in out
