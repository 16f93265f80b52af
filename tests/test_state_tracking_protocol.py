"""The state-tracking study's paper protocol (issue 19) on the CPU: that every value of study.toml's
[paper] table reaches the trainer and the model, that a stopped run resumes to the same numbers,
the official control's block kind (with a stand-in for mamba_ssm), the diagnostics, the gradient
comparison and the summary. Tiny models (d_model 16, a few steps)."""
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hybridlm.cli.main import main as cli
from hybridlm.studies import state_tracking, state_tracking_paper
from hybridlm.studies.config import StudyError, find_study_folder, load_config
from hybridlm.studies.driver import Options, run_study
from hybridlm.studies.state_tracking_diagnostics import measure
from hybridlm.studies.state_tracking_settings import RunSettings
from hybridlm.studies.state_tracking_train import Batches, Trainer, build_model, build_optimizer, lr_at

FOLDER = find_study_folder("state-tracking")


@pytest.fixture(scope="module", autouse=True)
def _forget_the_control_kind():
    """The study registers its control's block kind when it builds a model; other tests' processes
    know only the built-in kinds, and so should theirs in this one."""
    yield
    from hybridlm.builder.model.registry import _KINDS
    from hybridlm.layouts.registry import unregister_block_spec
    from hybridlm.studies.official_control import KIND

    _KINDS.pop(KIND, None)
    unregister_block_spec(KIND)


def paper_config(quick=False, **paper):
    return load_config(FOLDER, state_tracking.Config, quick=quick,
                       overrides={"protocol": "paper", **({"paper": paper} if paper else {})})


def tiny(**changes) -> RunSettings:
    base = dict(task="parity", spec=str(FOLDER / "paper-mamba3.yaml"), d_model=16, layers=1, seed=0, steps=6,
                batch=4, lr=3e-3, weight_decay=0.0, warmup_steps=1, min_lr_factor=0.001, min_length=3, first_max=4,
                last_max=6, stages=2, steps_per_stage=3, eval_lengths=[8], report_length=8, eval_every=2,
                eval_samples=16, diagnostics_every=6, log_freq=1)
    return RunSettings(**{**base, **changes})


# -- the protocol's values reach the runs ---------------------------------------------------------------
def test_the_paper_protocol_plans_the_full_sweep_with_the_papers_settings():
    cfg = paper_config()
    runs = state_tracking.plan(cfg, {}).runs
    lrs = cfg.paper.lrs()
    assert len(lrs) == 8 and lrs[0] == 1e-4 and lrs[-1] == 1e-2
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) / min(ratios) < 1.01  # log-spaced (3 significant digits)
    assert len(runs) == len(cfg.paper.models) * 2 * 8 and {r.meta["width"] for r in runs} == {32, 64}
    per_lr = 2 * len(cfg.paper.models)
    order = [r.meta["lr"] for r in runs[::per_lr]]  # 2 widths x the models an lr; from 1e-3 outwards
    assert [set(order[i:i + 2]) for i in range(0, 8, 2)] == [{7.2e-4, 1.39e-3}, {3.73e-4, 2.68e-3},
                                                             {1.93e-4, 5.18e-3}, {1e-4, 1e-2}]
    for run in runs:
        s = RunSettings.from_flags(run.train_flags)  # what the trainer process will read
        assert (s.task, s.layers, s.batch, s.steps, s.steps_per_stage, s.stages) == ("parity", 1, 256, 40_000,
                                                                                       10_000, 4)
        assert (s.min_length, s.first_max, s.last_max) == (3, 40, 160)
        assert (s.length_per, s.logits_over) == ("example", "answers")
        assert (s.warmup_steps, s.min_lr_factor, s.max_norm, s.weight_decay) == (2000, 0.001, 0.0, 0.0)
        assert (s.beta1, s.beta2) == (0.9, 0.999)
        assert (s.eval_every, s.report_length, s.eval_lengths) == (100, 256, [40, 160, 256])
        assert (s.diagnostics_every, s.checkpoint_every) == (1000, 1000)
        assert s.d_model == run.meta["width"] and s.lr == run.meta["lr"] and run.steps == 40_000
    arith = paper_config(tasks=["arith"])
    s = RunSettings.from_flags(state_tracking.plan(arith, {}).runs[0].train_flags)
    assert (s.layers, s.weight_decay) == (3, 0.1)


def test_a_subset_of_the_lrs_runs_with_the_ids_and_settings_of_the_whole_sweep():
    """paper.lr_subset: only those lrs run (the four an earlier session's record lacks, say), each run with the
    id and flags it has in the whole sweep, so its record joins the others; an lr off the sweep is refused."""
    whole = {r.id: r.train_flags for r in state_tracking.plan(paper_config(), {}).runs}
    part = state_tracking.plan(paper_config(lr_subset=[1e-4, 1.93e-4, 5.18e-3, 1e-2]), {}).runs
    assert len(part) == 4 * 2 * len(paper_config().paper.models)
    assert {r.meta["lr"] for r in part} == {1e-4, 1.93e-4, 5.18e-3, 1e-2}
    assert all(whole[r.id] == r.train_flags for r in part)
    from hybridlm.studies.config import StudyError

    with pytest.raises(StudyError, match=r"paper.lr_subset names 0.005, not among the sweep's lrs 0.0001, 0.000193"):
        paper_config(lr_subset=[5e-3, 1e-2])


def test_run_patterns_mix_tasks_and_models_in_one_call_with_the_sweeps_ids():
    """paper.only_runs: the arithmetic runs of one width beside rotation off's parity runs at one lr, each run
    with its id and flags in the whole sweep; a pattern that matches nothing is refused by name."""
    from hybridlm.studies.config import StudyError

    tasks = ["parity", "arith"]
    whole = {r.id: r.train_flags for r in state_tracking.plan(paper_config(tasks=tasks), {}).runs}
    patterns = ["paper-*-arith-d32-lr0.000373", "paper-real-mixer-parity-*-lr0.0001"]
    part = state_tracking.plan(paper_config(tasks=tasks, only_runs=patterns), {}).runs
    models = paper_config().paper.models
    assert sorted(r.id for r in part) == sorted(
        [f"paper-{m}-arith-d32-lr0.000373" for m in models] + [f"paper-real-mixer-parity-d{w}-lr0.0001" for w in (32, 64)])
    assert all(whole[r.id] == r.train_flags for r in part)
    assert {r.meta["layers"] for r in part if r.meta["task"] == "arith"} == {3}
    with pytest.raises(StudyError, match=r"paper.only_runs pattern\(s\) paper-\*-arith-\* match no run"):
        paper_config(only_runs=["paper-*-arith-*"])  # parity alone is planned


def test_how_often_a_run_is_looked_at_is_not_part_of_its_key():
    """A finer evaluation (or logging, checkpoint) cadence resumes the runs in progress; anything that
    changes what is trained starts them over."""
    def key(**paper):
        cfg = paper_config(**paper)
        run = state_tracking.plan(cfg, {}).runs[0]
        return run.key(cfg.path(cfg.train_config))

    base = key()
    assert key(eval_every=50, diagnostics_every=500, checkpoint_every=500, log_freq=10) == base
    assert key(max_norm=1.0) != base and key(warmup_steps=1000) != base
    with pytest.raises(StudyError, match="multiple of eval.every"):
        RunSettings.from_flags(tiny().to_flags() + ["--eval.every", "4"])  # diagnostics every 6


def test_the_packed_protocol_stays_the_default():
    cfg = load_config(FOLDER, state_tracking.Config)
    assert cfg.protocol == "packed" and cfg.budget_minutes == 20
    assert all(r.meta["phase"] == "sweep" for r in state_tracking.plan(cfg, {}).runs)
    paper = paper_config().paper.model_dump()
    with pytest.raises(ValueError, match="paper.weight_decay names no value for task.s. parity"):
        state_tracking_paper.PaperProtocol.model_validate({**paper, "weight_decay": {"arith": 0.1}})


def test_every_setting_survives_the_flags():
    s = tiny(eval_lengths=[8, 16], report_length=16, max_norm=0.5, beta2=0.98)
    assert RunSettings.from_flags(s.to_flags()) == s
    with pytest.raises(StudyError, match="unknown flag --optimizer.lrr"):
        RunSettings.from_flags(["--optimizer.lrr", "1"])


def test_weight_decay_zero_reaches_the_optimizer_for_parity_and_decay_elsewhere():
    model = build_model(tiny(), "cpu")
    assert {g["weight_decay"] for g in build_optimizer(model, tiny()).param_groups} == {0.0}
    opt = build_optimizer(model, tiny(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    mixer = model.layers[0].mixer
    assert id(mixer.in_proj.weight) in decayed and id(mixer.dt_bias) not in decayed
    from hybridlm.titan.optim import param_groups  # hybridlm train's groups: the same parameters in each
    for ours, titans in zip(opt.param_groups, param_groups(model, 0.1)):
        assert [id(p) for p in ours["params"]] == [id(p) for p in titans["params"]]
        assert ours["weight_decay"] == titans["weight_decay"]
    # with zero gradients only the decay moves the weights: none for parity
    for wd, moved in ((0.0, False), (0.1, True)):
        model = build_model(tiny(), "cpu")
        opt = build_optimizer(model, tiny(weight_decay=wd))
        before = model.layers[0].mixer.in_proj.weight.clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert (not torch.equal(before, model.layers[0].mixer.in_proj.weight)) == moved


def test_the_model_has_the_specs_width_depth_heads_and_paper_era_a():
    model = build_model(tiny(d_model=32, layers=3), "cpu")
    mixers = [layer.mixer for layer in model.layers if hasattr(layer.mixer, "in_proj")]
    assert len(mixers) == 3 and model.spec.d_model == 32
    for m in mixers:
        assert (m.nheads, m.headdim, m.d_state, m.a_activation) == (4, 16, 64, "softplus")
        dt = F.softplus(m.dt_bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001  # log-uniform in [dt_min, dt_max]
    assert len([layer for layer in build_model(tiny(d_model=64), "cpu").layers if hasattr(layer.mixer, "in_proj")]) == 1
    assert build_model(tiny(d_model=64), "cpu").layers[0].mixer.nheads == 8


def test_learning_rate_warms_up_then_follows_the_cosine_down_to_its_floor():
    s = tiny(steps=10_000, warmup_steps=2000, lr=1e-3, min_lr_factor=1e-3)
    assert lr_at(s, 0) == pytest.approx(1e-3 / 2000) and lr_at(s, 999) == pytest.approx(0.5e-3)
    assert lr_at(s, 2000) == pytest.approx(1e-3)
    mid = 2000 + (10_000 - 1 - 2000) / 2
    assert lr_at(s, int(mid)) == pytest.approx(1e-3 * (1e-3 + (1 - 1e-3) * 0.5), rel=1e-3)
    assert lr_at(s, 9999) == pytest.approx(1e-6)


def test_curriculum_stages_change_the_lengths_and_batches_are_right():
    s = tiny(steps=40_000, steps_per_stage=10_000, stages=4, first_max=40, last_max=160, batch=256)
    batches = Batches(s)
    for stage, top in enumerate((40, 80, 120, 160)):
        lengths = [batches.length(stage * 10_000 + i) for i in range(0, 10_000, 50)]
        assert min(lengths) >= 3 and max(lengths) == top
    ids, answers, ends = batches(35_000)
    assert (ends == batches.length(35_000)).all()
    assert ids.shape == (256, batches.length(35_000) + 1) and (ids[:, -1] == ord("=")).all()
    ones = (ids[:, :-1] == ord("1")).sum(1)
    assert set(ids[:, :-1].unique().tolist()) <= {ord("0"), ord("1")}
    assert torch.equal(answers, torch.where(ones % 2 == 1, ord("1"), ord("0")))
    assert torch.equal(ids, Batches(s)(35_000).ids)  # step s's batch depends on (seed, s) only: resumable
    arith_ids, arith_answers, _ = Batches(tiny(task="arith", batch=8))(0)
    from hybridlm.eval.tasks.state_tracking import evaluate_mod
    for row, answer in zip(arith_ids.tolist(), arith_answers.tolist()):
        assert str(evaluate_mod([chr(t) for t in row[:-1]])) == chr(answer)


@pytest.mark.parametrize("task", ["parity", "arith"])
def test_lengths_per_example_pad_on_the_right_and_leave_each_answer_as_alone(task):
    """Grazzi et al.'s batches: every example its own length in [3, the stage's max], right-padded.
    Each row reads its answer at its own '=': the loss of the padded batch is the mean of each
    example's loss computed alone, so padding reaches nothing."""
    from hybridlm.studies.state_tracking_train import PAD_ID, training_loss

    s = tiny(task=task, batch=12, first_max=9, last_max=9, min_length=3, length_per="example")
    batches = Batches(s)
    ids, answers, ends = batches(0)
    assert len(set(ends.tolist())) >= 3 and ends.min() >= 3
    assert ids.shape[1] == int(ends.max()) + 1 and torch.equal(batches(0).ids, ids)  # resumable
    rows = torch.arange(len(ids))
    assert (ids[rows, ends] == ord("=")).all()
    assert all((ids[r, int(e) + 1:] == PAD_ID).all() for r, e in enumerate(ends))
    if task == "parity":
        ones = [(ids[r, :int(e)] == ord("1")).sum().item() for r, e in enumerate(ends)]
        assert answers.tolist() == [ord("1") if n % 2 else ord("0") for n in ones] and ends.max() <= 9
    model = build_model(s, "cpu")
    loss = training_loss(model, "none")
    alone = torch.stack([loss(ids[r:r + 1, :int(e) + 1], answers[r:r + 1], e.view(1))
                         for r, e in enumerate(ends)])
    torch.testing.assert_close(loss(ids, answers, ends), alone.mean(), rtol=1e-5, atol=1e-6)
    one_length = Batches(tiny(task=task, batch=12, first_max=9, last_max=9, min_length=3))(0)
    assert len(set(one_length.ends.tolist())) == 1


# -- stopping and resuming -----------------------------------------------------------------------------
def test_a_stopped_run_resumes_to_the_same_numbers(tmp_path):
    whole = Trainer(tiny(), tmp_path / "whole", "k")
    assert whole.train() == "done"
    parts = tmp_path / "parts"
    first = Trainer(tiny(), parts, "k")
    assert first.train(stop_after_steps=3) == "paused"  # mid logging interval and between evaluations
    assert json.loads((parts / "progress.json").read_text())["step"] == 3
    second = Trainer(tiny(), parts, "k")
    assert second.resume() == "resumed from the checkpoint at step 3"
    assert second.train() == "done"
    assert second.losses == whole.losses
    assert [h["accuracy@8"] for h in second.history] == [h["accuracy@8"] for h in whole.history]
    assert [h["step"] for h in second.history] == [0, 2, 4, 6]
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    result = json.loads((parts / "result.json").read_text())
    assert result["best"]["scaled_accuracy"] == max(h["scaled_accuracy@8"] for h in whole.history)
    last = torch.load(parts / "last.pt", weights_only=False)  # the finished run's weights, kept past checkpoint.pt
    assert last["step"] == 6 and all(torch.equal(last["model"][k], v) for k, v in whole.model.state_dict().items())
    assert Trainer(tiny(), parts, "other key").resume().startswith("checkpoint of another run key")


def test_a_compiled_step_trains_to_the_same_numbers(tmp_path):
    """``compile`` traces the step's forward and loss with dynamic lengths (the GPU runs it with
    reduce-overhead); aot_eager runs the same trace without code generation: bitwise the eager run,
    over lengths 3..6 from one trace."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = Trainer(tiny(diagnostics_every=0), tmp_path / "eager")
    eager.train()
    compiled = Trainer(tiny(diagnostics_every=0, compile="aot_eager"), tmp_path / "compiled")
    compiled.train()
    assert compiled.losses == eager.losses
    for a, b in zip(eager.model.state_dict().values(), compiled.model.state_dict().values()):
        assert torch.equal(a, b)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    with pytest.raises(ValueError, match="compile.mode"):
        tiny(compile="fast")


def test_clipping_only_when_asked_and_a_spent_time_limit_pauses_at_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: calls.append(norm))
    Trainer(tiny(steps=2, diagnostics_every=0), tmp_path / "a").train()
    assert calls == []  # max_norm 0: Grazzi et al. clip nothing
    Trainer(tiny(steps=2, diagnostics_every=0, max_norm=1.0), tmp_path / "b").train()
    assert calls == [1.0, 1.0]
    paused = Trainer(tiny(diagnostics_every=0), tmp_path / "c")
    assert paused.train(time_limit=0.0) == "paused" and paused.step == 0
    assert (tmp_path / "c" / "checkpoint.pt").is_file()


def test_runs_are_not_started_without_time_left(tmp_path):
    import time

    from hybridlm.studies.resumable_runner import ResumableExecutor
    from hybridlm.studies.results import ResultStore

    cfg = paper_config(quick=True)
    executor = ResumableExecutor(recipe=cfg.path(cfg.train_config), work=tmp_path / "work",
                                 store=ResultStore(tmp_path, "state-tracking", "t"), log=lambda m: None)
    runs = state_tracking.plan(cfg, {}).runs
    outcome = executor.run_all(runs, deadline=time.monotonic() + executor.stop_margin_seconds + 1)
    assert outcome.postponed == [r.id for r in runs] and not (tmp_path / "work").exists()


def test_the_study_stops_each_call_and_resumes_the_next(tmp_path, capsys):
    opts = dict(quick=True, out=tmp_path, only=["mamba3"], jobs=1,
                overrides={"protocol": "paper", "paper": {"steps_per_call": 2}})
    assert run_study("state-tracking", Options(**opts)) == 3  # stopped: run the same command again
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs == {}
    run_id = state_tracking_paper.run_id("mamba3", "parity", 16, 3e-3)
    assert json.loads((tmp_path / "work" / run_id / "progress.json").read_text())["step"] == 2
    assert run_study("state-tracking", Options(**opts)) == 0
    record = json.loads((tmp_path / "results.json").read_text())["runs"][run_id]
    assert record["status"] == "done" and record["train"]["steps"] == 4
    assert [s for s, _ in record["train"]["losses"]] == [1, 2, 3, 4]
    assert [(sl["from"], sl["to"]) for sl in record["train"]["slices"]] == [(0, 2), (2, 4)]
    assert "resuming at step 2" in capsys.readouterr().out
    assert run_study("state-tracking", Options(**opts)) == 0
    assert "start " not in capsys.readouterr().out
    assert (tmp_path / "state-tracking-paper.png").stat().st_size > 1000
    assert (tmp_path / "state-tracking-paper-diagnostics-mamba3-parity.png").stat().st_size > 1000


def test_dry_run_lists_every_run_with_its_steps_and_the_planned_time(capsys):
    assert cli(["study", "state-tracking", "--dry-run", "--set", "protocol=paper"]) == 0
    out = capsys.readouterr().out
    assert out.count("40,000 steps") == 128 and "planned GPU wall time" in out  # 8 models x 2 widths x 8 lrs
    assert "paper-official-parity-d64-lr0.01" in out and "paper-mamba3-mixer-parity-d32-lr0.0001" in out
    assert "paper-official-mixer-parity-d64-lr0.01" in out and "hybridlm.studies.state_tracking_train" in out


# -- the official control ------------------------------------------------------------------------------
def test_the_official_block_without_mamba_ssm_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    with pytest.raises(StudyError, match="block kind 'mamba3_official' needs the official mamba_ssm package"):
        build_model(tiny(spec=str(FOLDER / "paper-official.yaml")), "cpu")


def test_an_official_import_that_raises_names_the_cute_set_up(monkeypatch):
    """mamba_ssm imports the CuTe DSL, which raises RuntimeError (not ImportError) when its libraries
    are missing: the first GPU run of the control failed so, 15 runs with a deep traceback each."""
    import importlib

    from hybridlm.studies import official_control

    real = importlib.import_module

    def failing(name, *args):
        if name == official_control.OFFICIAL_MODULE:
            raise RuntimeError("No CTK flavor installed: expected one or more of ...\nmore")
        return real(name, *args)

    monkeypatch.setattr(official_control.importlib, "import_module", failing)
    with pytest.raises(StudyError, match=r"fails to import \(RuntimeError: No CTK flavor.*\.gpu-cute/setup\.sh"):
        official_control.official_class()


def test_a_solved_run_ends_at_the_evaluation_that_solves_it(tmp_path, monkeypatch):
    """``solved_at``: once the best held-out scaled accuracy reaches it, training on cannot raise the
    reported number, so the run is done there (its curve and result kept); 0 trains every step."""
    from hybridlm.studies import state_tracking_train

    trainers = []
    monkeypatch.setattr(state_tracking_train, "accuracy",
                        lambda model, examples, **_: 1.0 if trainers[-1].step >= 4 else 0.5)
    for solved_at, steps in ((1.0, 4), (0.0, 6)):
        trainers.append(Trainer(tiny(diagnostics_every=0, solved_at=solved_at), tmp_path / str(solved_at)))
        assert trainers[-1].train() == "done" and trainers[-1].step == steps
    result = json.loads((tmp_path / "1.0" / "result.json").read_text())
    assert result["train"]["solved"] and result["best"] == {"step": 4, "scaled_accuracy": 1.0, "cells": {"8": 1.0}}
    assert [h["step"] for h in result["history"]] == [0, 2, 4]
    assert paper_config().paper.solved_at == 1.0


def test_the_autotune_turn_is_one_process_at_a_time(tmp_path):
    """Runs side by side take turns for the official kernels' first autotune (a lock file in their
    shared folder): while one holds it, another process cannot take it."""
    import subprocess

    from hybridlm.studies.official_control import autotune_turn

    probe = ("import fcntl, sys; h = open(sys.argv[1], 'w')\n"
             "try:\n    fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB); print('took')\n"
             "except BlockingIOError:\n    print('waits')")
    lock = str(tmp_path / ".official-autotune.lock")
    with autotune_turn(tmp_path) as turn:
        held = subprocess.run([sys.executable, "-c", probe, lock], capture_output=True, text=True).stdout.strip()
    free = subprocess.run([sys.executable, "-c", probe, lock], capture_output=True, text=True).stdout.strip()
    assert turn and (held, free) == ("waits", "took")


def test_a_run_waiting_for_the_autotune_turn_gives_up_at_its_deadline(tmp_path):
    """A run queued behind another's autotune stops waiting when its time is up (then it trains no
    step and pauses), instead of carrying the call past its limit."""
    import subprocess
    import time

    from hybridlm.studies.official_control import autotune_turn

    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, sys, time; h = open(sys.argv[1], 'w'); fcntl.flock(h, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(30)", str(tmp_path / ".official-autotune.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with autotune_turn(tmp_path, wait_seconds=1.0) as turn:
            waited = time.monotonic() - started
    finally:
        holder.kill()
    assert not turn and 1.0 <= waited < 5.0


def test_the_warm_up_changes_nothing_a_run_computes(tmp_path):
    """The control's warm-up (one forward and backward before step 0, gradients dropped) leaves the
    weights, the optimizer and the data stream as they were: the run's numbers are bitwise the same."""
    plain = Trainer(tiny(steps=3, diagnostics_every=0), tmp_path / "plain")
    plain.train()
    warmed = Trainer(tiny(steps=3, diagnostics_every=0), tmp_path / "warmed")
    warmed.warm_up()
    assert all(p.grad is None for p in warmed.model.parameters())
    warmed.train()
    assert warmed.losses == plain.losses
    for a, b in zip(plain.model.state_dict().values(), warmed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_embedding_std_redraws_the_table_alike_for_every_model_kind(fake_mamba_ssm):
    """``embedding_std`` (Grazzi et al.'s harness: nn.Embedding's N(0, 1)) redraws only the token
    embedding, from the seed alone, so ours and the control still start from the same weights."""
    base, wide = build_model(tiny(), "cpu"), build_model(tiny(embedding_std=1.0), "cpu")
    control = build_model(tiny(spec=str(FOLDER / "paper-official.yaml"), embedding_std=1.0), "cpu")
    table = wide.tok_embeddings.weight
    assert 0.9 < float(table.std()) < 1.1 and abs(float(base.tok_embeddings.weight.std()) - 0.02) < 0.005
    theirs = control.state_dict()
    for name, value in wide.state_dict().items():
        assert torch.equal(value, theirs[name]), name
        if name != "tok_embeddings.weight":
            assert torch.equal(value, base.state_dict()[name]), name
    assert RunSettings.from_flags(tiny(embedding_std=1.0).to_flags()).embedding_std == 1.0


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    """mamba_ssm.modules.mamba3.Mamba3 stood in by hybridlm's block with the official signature."""
    from hybridlm.blocks import Mamba3

    class FakeOfficial(Mamba3):
        def __init__(self, d_model, **kwargs):
            super().__init__(d_model, **kwargs, a_activation="softplus")
            self.num_bc_heads = self.ngroups
            self.dt_bias.data.fill_(-1.0)  # the official constructor's own draw, which reset_parameters replaces

        def forward(self, u, seq_idx=None, cu_seqlens=None, inference_params=None):
            return super().forward(u, cu_seqlens)

    for name in ("mamba_ssm", "mamba_ssm.modules"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType("mamba_ssm.modules.mamba3")
    module.Mamba3 = FakeOfficial
    monkeypatch.setitem(sys.modules, "mamba_ssm.modules.mamba3", module)
    return FakeOfficial


def test_the_official_block_gets_our_init_and_trains_through_the_same_loop(fake_mamba_ssm, tmp_path):
    ours = build_model(tiny(), "cpu")
    official = build_model(tiny(spec=str(FOLDER / "paper-official.yaml")), "cpu")
    assert isinstance(official.layers[0].mixer, fake_mamba_ssm)
    assert official.spec.blocks["M"].kind == "mamba3_official"
    theirs = official.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name]), name  # the same weights, draw for draw
    ids = Batches(tiny())(0).ids
    torch.testing.assert_close(official(ids), ours(ids), rtol=0, atol=0)
    with pytest.raises(StudyError, match="does not decode"):
        official.layers[0].mixer(torch.zeros(1, 1, 16), cache=object())
    short = dict(steps=2, diagnostics_every=2)
    a = Trainer(tiny(**short), tmp_path / "a")
    b = Trainer(tiny(spec=str(FOLDER / "paper-official.yaml"), **short), tmp_path / "b")
    a.train(), b.train()
    assert a.losses == b.losses and b.history[-1]["diagnostics"][0]["decay"] == a.history[-1]["diagnostics"][0]["decay"]


def test_the_official_spec_refuses_sizes_its_kernel_does_not_take():
    from hybridlm import ModelSpec
    from hybridlm.errors import SpecError
    from hybridlm.studies.official_control import register

    register()

    raw = {"version": 1, "name": "x", "vocab_size": 256, "d_model": 32, "pattern": "M",
           "blocks": {"M": {"kind": "mamba3_official", "d_state": 64, "headdim": 8}}}
    with pytest.raises(SpecError, match="headdim.*powers of two from 16"):
        ModelSpec.model_validate(raw)


# -- diagnostics ------------------------------------------------------------------------------------------
def test_diagnostics_match_a_direct_computation_from_the_weights():
    model = build_model(tiny(), "cpu")
    with torch.no_grad():  # make the angles and Δ differ per head and token
        model.layers[0].mixer.in_proj.weight.mul_(3.0)
    ids = Batches(tiny(batch=6, first_max=12, last_max=12, min_length=12))(0).ids
    got = measure(model, ids, ord("1"), ord("0"))[0]
    mixer = model.layers[0].mixer
    with torch.no_grad():
        u = model.layers[0].norm(model.tok_embeddings(ids))[:, :-1]
        rows = mixer.in_proj_layout().offsets()
        proj = {k: u @ mixer.in_proj.weight[a:a + w].T for k, (a, w) in rows.items()}
        dt = torch.log1p(torch.exp(proj["dt"] + mixer.dt_bias))  # softplus, written out
        a = torch.log1p(torch.exp(proj["A"])).clamp(min=mixer.A_floor)
        turn = dt[..., :, None] * torch.tanh(proj["angle"])[..., None, :]
        symbols = ids[:, :-1]
        for token, key in ((ord("1"), "turn_on_1"), (ord("0"), "turn_on_0")):
            expected = turn[symbols == token].mean(0)
            torch.testing.assert_close(torch.tensor(got[key]), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(got["decay"]), (a * dt).mean((0, 1)), rtol=1e-5, atol=1e-7)
    assert len(got["turn_on_1"]) == 2 and len(got["turn_on_1"][0]) == 16  # 2 heads x 16 rotated pairs
    real = measure(build_model(tiny(spec=str(FOLDER / "paper-real.yaml")), "cpu"), ids, ord("1"), ord("0"))[0]
    assert real["turn_on_1"] == [[], []] and all(v > 0 for v in real["decay"])


# -- gradient comparison ---------------------------------------------------------------------------------
def test_gradient_comparison_lists_the_angle_path_first_and_sees_a_difference():
    from hybridlm.studies.gradient_compare import compare, parity_batch

    a, b = build_model(tiny(), "cpu"), build_model(tiny(), "cpu")
    b.layers[0].mixer.backend = "sequential"  # the token-by-token recurrence: the same math
    ids, answers = parity_batch(4, 12, seed=0)
    result = compare(a, b, ids, answers)
    names = [r["name"] for r in result["rows"]]
    assert names[:5] == ["layers.0.mixer.in_proj[angle]", "layers.0.mixer.dt_bias", "layers.0.mixer.in_proj[dt]",
                         "layers.0.mixer.in_proj[A]", "layers.0.mixer.in_proj[trap]"]
    assert all(r["rel_diff"] < 1e-4 for r in result["rows"] if r["norm_b"] > 1e-8), result["rows"]
    with torch.no_grad():
        b.layers[0].mixer.dt_bias.add_(0.5)
    changed = {r["name"]: r["rel_diff"] for r in compare(a, b, ids, answers)["rows"]}
    assert changed["layers.0.mixer.in_proj[angle]"] > 1e-2


# -- the summary -----------------------------------------------------------------------------------------
def test_the_summary_reports_each_models_best_run_over_the_sweep(tmp_path):
    cfg = paper_config(quick=True, widths=[16, 32], lr_count=2, lr_max=1e-2, eval_lengths=[4, 8])
    planned = state_tracking.plan(cfg, {}).runs
    diag = [{"layer": 0, "turn_on_1": [[0.9, 0.1]], "turn_on_0": [[0.01, 0.0]], "decay": [1e-3]}]
    finished = {}
    for i, run in enumerate(planned):
        score = 0.1 * i
        history = [{"step": 0, "scaled_accuracy@8": 0.0, "scaled_accuracy@4": 0.0, "diagnostics": diag},
                   {"step": 1, "scaled_accuracy@8": 0.0, "scaled_accuracy@4": 0.987},
                   {"step": 2, "scaled_accuracy@8": score, "scaled_accuracy@4": 0.5, "diagnostics": diag}]
        finished[run.id] = {"id": run.id, "meta": run.meta, "history": history,
                            "best": {"step": 2, "scaled_accuracy": score},
                            "train": {"steps": 4, "losses": [[2, 0.0123], [4, 0.5]], "seconds": 1.0,
                                      "seconds_per_step": 0.25}}
    summary = state_tracking.summarize(cfg, finished, tmp_path, [])
    # each run's row: the best at the other lengths over every evaluation, the lowest and the last loss
    # (held: no window of evaluations every_eval steps apart here)
    assert f"| {planned[0].id} | 4/4 | done | 0.0 | 2 | – | 98.7 | 0.0123 | 0.5000 |" in summary.markdown
    last_official = [r for r in planned if r.meta["model"] == "official"][-1]
    best = summary.data["best"]["official/parity"]
    assert best["run"] == last_official.id
    assert best["scaled_accuracy"] == pytest.approx(0.1 * planned.index(last_official))
    assert best["complete"] and "Mamba-3, official mamba_ssm module (control)" in summary.markdown
    assert "on '1' 0.900" in summary.markdown
    names = {p.name for p in summary.plots}
    assert {"state-tracking-paper.png", "state-tracking-paper-sweep.png",
            "state-tracking-paper-diagnostics-mamba3-parity.png"} <= names
    assert all(p.stat().st_size > 1000 for p in summary.plots)
    assert math.isclose(cfg.paper.lrs()[1], 1e-2)


def test_held_accuracy_ignores_a_one_evaluation_peak(tmp_path, monkeypatch):
    """The paper's measure is a run's best evaluation; "held" is the best value every evaluation of a window
    of consecutive evaluations reached, so a lone peak (a run that answers right at 256 for one evaluation
    between chance and inverted ones, as session 24's winner did) does not count, a plateau does, and a gap
    in a trimmed record ends a window."""
    from hybridlm.studies import state_tracking_paper as paper

    def hist(values, every=100, start=0):
        return [{"step": start + every * i, "scaled_accuracy@256": v} for i, v in enumerate(values)]

    peak = hist([0.0, -0.5, 0.99, -0.02, 0.0] * 4)
    plateau = hist([0.1] * 3 + [0.7, 0.8, 0.75, 0.72] * 3)
    assert paper.held_best(peak, 256, 100, steps=300) == pytest.approx(-0.02)  # never above chance for 3
    assert paper.held_best(plateau, 256, 100, steps=300) == pytest.approx(0.72)
    gapped = hist([0.9, 0.9]) + hist([0.9, 0.9], start=400)  # steps 0, 100, 400, 500: no 3 in a row
    assert paper.held_best(gapped, 256, 100, steps=300) is None
    assert paper.held_best(gapped, 256, 100, steps=200) == pytest.approx(0.9)

    monkeypatch.setattr(paper, "HOLD_STEPS", 4)  # 2 evaluations in a row at every 2 steps
    cfg = paper_config(quick=True, widths=[16], lr_count=2, lr_max=1e-2, eval_lengths=[8])
    planned = [r for r in state_tracking.plan(cfg, {}).runs if r.meta["model"] == "mamba3"]
    finished = {}
    for run, values in zip(planned, ([0.0, 0.95, 0.0], [0.6, 0.7, 0.65])):  # a peak; a plateau
        history = [{"step": 2 * i, "scaled_accuracy@8": v} for i, v in enumerate(values)]
        finished[run.id] = {"id": run.id, "meta": run.meta, "history": history,
                            "best": {"step": 2, "scaled_accuracy": max(values)},
                            "train": {"steps": 4, "losses": [[4, 0.1]], "seconds": 1.0, "seconds_per_step": 0.25}}
    summary = state_tracking.summarize(cfg, finished, tmp_path, [])
    best = summary.data["best"]["mamba3/parity"]
    assert best["run"] == planned[0].id and best["scaled_accuracy"] == pytest.approx(0.95)
    assert best["held"] == {"scaled_accuracy": pytest.approx(0.65), "run": planned[1].id}
    assert summary.data["runs"][planned[0].id]["held"] == pytest.approx(0.0)
    assert "| Mamba-3 | 65.0 (d16, " in summary.markdown


def test_records_of_several_sessions_merge_into_one_summary(tmp_path):
    """state_tracking_merge: the furthest record of a run wins, a run at its planned steps is finished and any
    other paused (its progress written where the summary reads a run in progress), unknown ids are listed."""
    from hybridlm.studies.state_tracking_merge import summarize_records

    cfg = paper_config(quick=True, widths=[16], lr_count=2, lr_max=1e-2, eval_lengths=[8])
    planned = [r for r in state_tracking.plan(cfg, {}).runs if r.meta["model"] == "mamba3"]
    steps = planned[0].steps

    def run(step, best, values):
        history = [{"step": 2 * i, "scaled_accuracy@8": v} for i, v in enumerate(values)]
        return {"step": step, "best": {"step": 0, "scaled_accuracy": best}, "losses": [[step, 0.3]],
                "history": history}

    early = {"runs": {planned[0].id: run(2, 0.9, [0.9, 0.0])}}
    later = {"runs": {planned[0].id: run(steps, 0.4, [0.4, 0.4]), planned[1].id: run(1, 0.2, [0.2]),
                      "paper-mamba3-parity-d999-lr1": run(5, 0.5, [0.5])}}
    summary, unknown = summarize_records(cfg, [early, later], tmp_path)
    assert unknown == ["paper-mamba3-parity-d999-lr1"]
    runs = summary.data["runs"]
    assert runs[planned[0].id]["done"] and runs[planned[0].id]["best"]["scaled_accuracy"] == 0.4  # the later one
    assert not runs[planned[1].id]["done"] and runs[planned[1].id]["step"] == 1
    assert (tmp_path / "work" / planned[1].id / "progress.json").is_file()
    assert f"| {planned[1].id} | 1/{steps:,} | paused |" in summary.markdown


def test_the_merged_summary_plans_the_tasks_its_records_trained():
    """A record of arithmetic runs puts arithmetic in the merged summary (study.toml plans parity alone), and
    'arith-brackets' is not read as 'arith'."""
    from hybridlm.studies.state_tracking_merge import record_tasks

    def record(*ids):
        return {"runs": {i: {} for i in ids}}

    assert record_tasks([record("paper-mamba3-mixer-parity-d32-lr0.000193")]) == ["parity"]
    assert record_tasks([record("paper-real-mixer-arith-d32-lr0.00072"),
                         record("paper-mamba3-parity-d64-lr1e-4")]) == ["parity", "arith"]
    assert record_tasks([record("paper-mamba3-arith-brackets-d32-lr0.01")]) == ["arith-brackets"]
    assert record_tasks([record("paper-mamba3-arith-sum-d32-lr0.01"), record("paper-real-arith-brackets-sum-d64-lr0.01"),
                         record("paper-real-arith-d64-lr0.01")]) == ["arith", "arith-sum", "arith-brackets-sum"]
    assert record_tasks([record("unrelated")]) == []


@pytest.mark.parametrize("task", ["parity", "arith"])
def test_batches_padded_to_the_stage_hold_the_same_examples_and_loss(task):
    """``cuda-graph`` pads every batch to its stage's longest example (one shape a stage): the same
    ids up to each row's '=', PAD after, the same answers and '=' positions, and the same loss (the
    models are causal: nothing after '=' reaches it), to fp32 summation order."""
    from hybridlm.studies.state_tracking_train import PAD_ID, answer_logits

    s = tiny(task=task, length_per="example", first_max=5, last_max=9)
    batches = Batches(s)
    model = build_model(s, "cpu")
    for step in (0, 4):
        plain, padded = batches(step), batches(step, padded=True)
        top = batches.curriculum.max_length(step)
        assert padded.ids.shape[1] == top + 1 >= plain.ids.shape[1]
        width = plain.ids.shape[1]
        assert torch.equal(padded.ids[:, :width], plain.ids) and (padded.ids[:, width:] == PAD_ID).all()
        assert torch.equal(padded.answers, plain.answers) and torch.equal(padded.ends, plain.ends)
        with torch.no_grad():
            losses = [F.cross_entropy(answer_logits(model, b.ids, b.ends), b.answers) for b in (plain, padded)]
        assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)


def test_cuda_graph_mode_is_checked_before_a_run_starts(tmp_path):
    """``cuda-graph`` needs lengths per example and no clipping (one clear error naming the fields),
    and a CUDA device (the Trainer says so on the CPU); its optimizer takes the lr as a device tensor
    that set_lr fills in place."""
    from hybridlm.studies.state_tracking_train import set_lr

    with pytest.raises(ValueError, match="length_per 'example'"):
        tiny(compile="cuda-graph", length_per="batch")
    with pytest.raises(ValueError, match="max_norm"):
        tiny(compile="cuda-graph", length_per="example", max_norm=1.0)
    s = tiny(compile="cuda-graph", length_per="example")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            Trainer(s, tmp_path / "run", device="cpu")
    model = build_model(tiny(), "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.1))
    lr = opt.param_groups[0]["lr"]
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.25
    plain = torch.optim.AdamW(model.parameters(), lr=0.1)
    set_lr(plain, 0.5)
    assert plain.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("task", ["parity", "arith"])
def test_logits_over_the_answers_are_the_vocabularys_logits_at_the_answer_tokens(task, tmp_path):
    """``logits_over = "answers"``: the loss is the cross-entropy of the answer tokens' own logits
    (a softmax over '0' '1', or the five digits) and the guess is the best of them; the same weights
    give the full-vocabulary loss when the other bytes' logits are pushed to -inf."""
    import torch.nn.functional as F

    from hybridlm.studies.state_tracking_train import answer_logits, accuracy

    full = Trainer(tiny(task=task, diagnostics_every=0), tmp_path / "vocab")
    only = Trainer(tiny(task=task, diagnostics_every=0, logits_over="answers"), tmp_path / "answers")
    only.model.load_state_dict(full.model.state_dict())
    batch = full.batches(3)
    with torch.no_grad():
        logits = answer_logits(full.model, batch.ids, batch.ends)
        masked = torch.full_like(logits, float("-inf"))
        answer_ids = only.classes.ids
        masked[:, answer_ids] = logits[:, answer_ids]
        assert torch.allclose(only.loss(*batch), F.cross_entropy(masked, batch.answers), rtol=1e-6, atol=1e-7)
        assert not torch.allclose(full.loss(*batch), only.loss(*batch), rtol=1e-3)
        examples = full.held_out[full.s.eval_lengths[0]]
        logits = answer_logits(only.model, examples.ids, examples.ends)
        best = answer_ids[logits[:, answer_ids].argmax(-1)]
        expected = float((best == examples.answers).float().mean())
    assert accuracy(only.model, examples, classes=only.classes) == pytest.approx(expected)
    assert len(answer_ids) == (2 if task == "parity" else 5)
