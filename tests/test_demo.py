"""`make demo` end to end at tiny cost: its recipe loads, trains a few steps, exports, and evaluates."""
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("torchtitan")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "specs" / "train" / "demo.toml"


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile has no {name}"
    return match.group(1).strip()


def hybridlm(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HYBRIDLM_PROGRESS": "lines"}
    proc = subprocess.run([sys.executable, "-m", "hybridlm", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_demo_recipe_and_specs_load():
    import hybridlm
    from hybridlm.eval.tasks import make_task

    recipe = tomllib.loads(RECIPE.read_text())
    task = recipe["hybrid"]["data"]
    assert task.startswith("task:") and recipe["hybrid"]["loss_on"] == "answers"
    make_task(task[5:], hybridlm.ByteTokenizer())  # a task the eval harness knows, options valid
    for model in makefile_var("DEMO_MODELS").split():
        spec = hybridlm.load_spec(ROOT / "specs" / "demo" / f"{model}-demo.yaml")
        params = sum(p.numel() for p in hybridlm.build_model(spec).parameters())
        assert 0.5e6 < params < 2e6, (model, params)  # "about 1M parameters", as the README says


def test_demo_recipe_trains_exports_and_evaluates(tmp_path):
    """The Makefile's train -> export -> eval chain, with the demo recipe cut to 3 steps of 2 rows."""
    dump, model, out = tmp_path / "run", tmp_path / "models" / "hybrid-demo", tmp_path / "eval"
    task = tomllib.loads(RECIPE.read_text())["hybrid"]["data"][5:]
    train = hybridlm("train", "specs/demo/hybrid-demo.yaml", "--config", str(RECIPE), "--job.dump_folder", str(dump),
                     "--training.steps", "3", "--training.local_batch_size", "2", "--lr_scheduler.warmup_steps", "1",
                     "--metrics.log_freq", "1")
    assert re.search(r"step\s+3/3\s+100%\s+loss", train.stdout), train.stdout
    assert "done: 3 steps" in train.stdout and "memory" not in train.stdout
    hybridlm("export", str(dump), "--out", str(model))
    hybridlm("eval", str(model), "--task", task, "--lengths", "1x,2x", "--samples", "2", "--batch-size", "2",
             "--device", "cpu", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    cells = {c["length_label"]: c for c in results["results"]}
    assert set(cells) == {"1x", "2x"} and 0 <= cells["1x"]["accuracy"] <= 1
    assert (out / "results.png").stat().st_size > 0


def test_training_progress_is_one_bar_redrawn_in_place():
    """On a terminal (or HYBRIDLM_PROGRESS=bar) each step line replaces the last one: one bar per model."""
    import logging

    from hybridlm.titan.progress import STEP_LINE, ProgressFormatter, RunFacts, parse_step_line

    fmt = ProgressFormatter(RunFacts("hybrid-demo", 100, "cpu", "runs/x", "runs/x/checkpoint", 1000), bar=True)

    def show(message: str) -> str:
        return fmt.format(logging.LogRecord("t", logging.INFO, __file__, 0, message, None, None))

    assert show("Model hybrid spec size: 1,000 total parameters").startswith("[hybridlm] hybrid-demo: 1,000")
    first = show("step: 10  loss:  3.21400  grad_norm:  1.9500  memory: -0.00GiB(-100.00%)  tps: 11,234  mfu: 0.00%")
    assert first.startswith("[hybridlm] hybrid-demo  [##..................]   10/100   10%  loss 3.21400")
    assert "grad_norm" not in first and "memory" not in first and "\x1b" not in first
    again = show("step: 20  loss:  2.00000  grad_norm:  1.0  tps: 11,234")
    assert again.startswith("\x1b[1A\x1b[2K\r[hybridlm] hybrid-demo  [####") and "ETA" in again
    assert parse_step_line(STEP_LINE.search(again)) == (20, 2.0, 11234.0)  # log readers still parse it
    assert not show("Training completed").startswith("\x1b")  # the last bar stays; "done" goes below it
