"""The state-tracking study's paper protocol on a GPU (issue 19): the official control at the study's
sizes, against hybridlm's block with the same weights, and a few training steps of each model
through the study's own loop. The official SISO kernels compute in bf16 (Q, K, V, angles): the
bounds are those of tests/gpu/test_official_equivalence.py, widened for the study's longer
sequences; unmeasured before the first GPU run of this file."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm.studies.gradient_compare import compare, parity_batch
from hybridlm.studies.state_tracking_settings import RunSettings
from hybridlm.studies.state_tracking_train import Trainer, build_model
from hybridlm.testing import rel_err

pytestmark = pytest.mark.gpu

FOLDER = Path(__file__).resolve().parents[2] / "specs/studies/state-tracking"


def settings(spec: str, width: int, **changes) -> RunSettings:
    base = dict(task="parity", spec=f"{FOLDER}/{spec}", d_model=width, layers=1, seed=0, steps=30, batch=256,
                lr=1e-3, weight_decay=0.0, warmup_steps=5, min_lr_factor=0.001, min_length=3, first_max=160,
                last_max=160, stages=1, steps_per_stage=30, eval_lengths=[256], report_length=256, eval_every=15,
                eval_samples=256, diagnostics_every=15, log_freq=5, logits_over="answers")  # the paper protocol's
    return RunSettings(**{**base, **changes})


@pytest.mark.parametrize("width", [32, 64])
def test_the_official_control_runs_at_the_study_sizes_and_agrees_with_ours(width):
    pytest.importorskip("mamba_ssm.modules.mamba3")
    ours = build_model(settings("paper-mamba3.yaml", width), "cuda")
    official = build_model(settings("paper-official.yaml", width), "cuda")
    official.load_state_dict(ours.state_dict())
    ids, answers = parity_batch(256, 160, seed=0)
    ids, answers = ids.cuda(), answers.cuda()
    with torch.no_grad():
        assert rel_err(official(ids), ours(ids)) < 3e-2
    result = compare(ours, official, ids, answers)
    angle_path = [r for r in result["rows"][:5] if r["norm_b"] > 1e-6]
    assert angle_path and all(r["cosine"] > 0.99 for r in angle_path), result["rows"][:5]


@pytest.mark.parametrize("spec", ["paper-mamba3.yaml", "paper-real.yaml", "paper-official.yaml",
                                  "paper-mamba2like.yaml"])
def test_each_model_trains_a_few_steps_in_the_study_loop(spec, tmp_path):
    if spec == "paper-official.yaml":
        pytest.importorskip("mamba_ssm.modules.mamba3")
    trainer = Trainer(settings(spec, 32), tmp_path)
    assert trainer.train() == "done"
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in trainer.losses)
    assert [h["step"] for h in trainer.history] == [0, 15, 30]
    assert trainer.history[-1]["diagnostics"][0]["decay"]


@pytest.mark.parametrize("spec", ["paper-mamba3.yaml", "paper-official.yaml"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "cuda-graph"])
def test_the_compiled_step_trains_like_the_eager_one(mode, spec, tmp_path):
    """``compile.mode``: the step's forward and loss through inductor (with CUDA graphs for
    reduce-overhead), lengths 3..160 (three chunk counts, so three traces), or the whole step captured
    in a CUDA graph (``cuda-graph``: batches padded to 160, lengths per example in both runs, two
    stages so that a second graph replaces the first). Inductor's fused fp32 arithmetic differs from
    eager in the last bits, and the backward's atomic bias sums are not ordered, and 30 AdamW steps
    carry that along: the first 5 losses within 1e-4 relative, every one within 5e-3 (below). Each run is its own process, as in the
    study: the first H200 run of reduce-overhead (torch 2.11, 2026-12-03) died of a segmentation fault
    in the backward, which must fail this test, not end the session. Prints the steps/s of both (the
    reason for the mode)."""
    if spec == "paper-official.yaml":
        pytest.importorskip("mamba_ssm.modules.mamba3")
    losses = {}
    extra = dict(length_per="example", first_max=80, stages=2, steps_per_stage=15) if mode == "cuda-graph" else {}
    for name, compile_mode in (("eager", "none"), ("compiled", mode)):
        flags = settings(spec, 32, log_freq=1, diagnostics_every=0, compile=compile_mode, **extra).to_flags()
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "hybridlm.studies.state_tracking_train", "--out", str(out),
                               *flags], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name} ({compile_mode}) exited {proc.returncode}: {proc.stdout[-1500:]}" \
                                     f"{proc.stderr[-1500:]}"
        progress = json.loads((out / "progress.json").read_text())
        losses[name] = torch.tensor([loss for _, loss in progress["losses"]])
        last = progress["slices"][-1]
        print(f"{spec} {name}: {last['steps_per_second']} steps/s ({last['steady_steps_per_second']} after warm-up)")
    rel = ((losses["compiled"] - losses["eager"]).abs() / losses["eager"].abs()).tolist()
    print(f"{spec} {mode}: relative loss difference per step, max of the first 5 {max(rel[:5]):.2e}, of all {max(rel):.2e}")
    # The first steps see the same weights and batches, so only summation order differs (cuda-graph pads to the
    # stage's longest example: another chunk count in the scan): 1e-4. Later the trajectories drift apart as
    # AdamW carries those last bits along: on the H200 (2026-12-04) the official control's cuda-graph run was
    # 1.5e-3 from eager at step ≈ 22 of 30 (identical to 4 digits before), failing the earlier bound of 1e-3.
    # The loss falls ≈ 1 % a step here (5.48, 5.44, 5.39, ...), so a graph that replayed a stale step (no
    # update, or the first stage's graph in the second) is past 5e-3 within a step or two.
    assert max(rel[:5]) <= 1e-4 and max(rel) <= 5e-3
