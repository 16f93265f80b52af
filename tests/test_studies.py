"""Study configs, plans, lr choice, summaries and results.json bookkeeping, without training."""
import json

import pytest

from hybridlm.cli.main import main
from hybridlm.eval.run import EvalRequest
from hybridlm.studies import discretization, out_norm, state_tracking
from hybridlm.studies.config import StudyError, find_study_folder, load_config
from hybridlm.studies.driver import STUDIES, overrides_from, parse_override, study_module
from hybridlm.studies.results import ResultStore, parse_train_log
from hybridlm.studies.runner import Run

ISSUE_GPU_MINUTES = 60  # issue 8: about an hour of device time for all three studies


def config(name, quick=False, **overrides):
    module = study_module(name)
    return module, load_config(find_study_folder(name), module.Config, quick=quick, overrides=overrides)


def planned_minutes(module, cfg) -> float:
    plan = module.plan(cfg, {}, preview=True, extra_meta={})
    seconds = sum(cfg.estimate.run_seconds(r.meta["spec"], r.steps) for r in plan.runs)
    return seconds / cfg.jobs / 60


@pytest.mark.parametrize("name", list(STUDIES))
def test_each_study_fits_its_stated_gpu_budget(name):
    module, cfg = config(name)
    assert planned_minutes(module, cfg) <= cfg.budget_minutes
    _, quick = config(name, quick=True)
    assert quick.train.steps < 10 and quick.title == cfg.title


def test_the_three_studies_fit_the_issue_budget():
    total = sum(config(name)[1].budget_minutes for name in STUDIES)
    assert total <= ISSUE_GPU_MINUTES - 10  # room for machine start-up and a --probe of each study


def test_state_tracking_follows_the_paper_protocol():
    _, cfg = config("state-tracking")
    assert cfg.layers == {"parity": 1, "arith": 3, "arith-brackets": 3, "arith-sum": 3, "arith-brackets-sum": 3}
    assert cfg.eval.report_length == 256 and cfg.train.steps == 10_000
    for model in cfg.models.values():
        for layers, spec in model.specs.items():
            text = (cfg.folder / spec).read_text()
            assert "d_model: 64" in text and "d_state: 64" in text and f"*{layers}" in text


def test_out_norm_models_differ_only_in_their_output_norm():
    import hybridlm

    _, cfg = config("out-norm")
    specs = [hybridlm.load_spec(cfg.folder / cfg.models[h].spec) for h in cfg.hybrids]
    norms = [s.blocks["M"].out_norm for s in specs]
    assert sorted(norms) == sorted(["none", "pregate_grouped", "pregate_default", "postgate_grouped",
                                    "postgate_default"])
    base = specs[0].to_dict()
    for s in specs[1:]:
        d = s.to_dict()
        d["blocks"]["M"].pop("out_norm", None), base["blocks"]["M"].pop("out_norm", None)
        assert {k: v for k, v in d.items() if k != "name"} == {k: v for k, v in base.items() if k != "name"}
    assert specs[0].blocks["A"].position == "nope" and specs[0].compact_pattern() == "(M F) *5 A F"


def test_discretization_models_differ_only_in_discretization():
    import hybridlm

    _, cfg = config("discretization")
    specs = {m: hybridlm.load_spec(cfg.folder / e.spec) for m, e in cfg.models.items()}
    assert {m: s.blocks["M"].discretization for m, s in specs.items()} == {
        "trapezoid": "trapezoid", "half": "half", "euler": "euler"}
    assert len({(s.d_model, s.compact_pattern(), s.blocks["M"].d_state) for s in specs.values()}) == 1


def test_bad_config_values_are_one_clear_error():
    with pytest.raises(StudyError, match=r"train\.steps"):
        config("out-norm", train={"steps": 0})
    with pytest.raises(StudyError, match="sweep.model 'nope'"):
        config("state-tracking", sweep={"model": "nope"})
    with pytest.raises(StudyError, match="not a state-tracking task"):
        config("state-tracking", tasks=["mqar"])
    with pytest.raises(StudyError, match="unknown task"):
        config("out-norm", train_task="nope")
    with pytest.raises(StudyError, match="unknown study"):
        study_module("nope")


def test_overrides_parse_as_toml_values():
    assert parse_override("train.steps=3000") == (["train", "steps"], 3000)
    assert parse_override("sweep.lrs=[1e-3, 3e-3]") == (["sweep", "lrs"], [1e-3, 3e-3])
    assert parse_override('corpus="runs/c"') == (["corpus"], "runs/c")
    assert parse_override("corpus=runs/c") == (["corpus"], "runs/c")  # bare words are strings
    assert overrides_from(["train.steps=5", "train.lr=0.01"]) == {"train": {"steps": 5, "lr": 0.01}}
    with pytest.raises(StudyError, match="KEY=VALUE"):
        parse_override("train.steps")


def _cells(task, lengths, scaled, nll=1.0):
    return [{"task": task, "length": n, "length_label": str(n), "accuracy": scaled, "chance": 0.0,
             "scaled_accuracy": scaled, "nll_per_token": nll, "model": "m", "examples": 4, "items": 4,
             "perplexity": None, "buckets": []} for n in lengths]


def _record(run: Run, cells, losses=((1, 5.0), (2, 4.0))):
    return {"id": run.id, "key": "k", "status": "done", "meta": run.meta, "eval": cells,
            "train": {"steps": run.steps, "seconds": 10.0, "seconds_per_step": 0.01, "final_loss": losses[-1][1],
                      "losses": [list(p) for p in losses], "tokens_per_second": 1000.0}}


def test_state_tracking_sweeps_first_then_uses_the_best_lr():
    _, cfg = config("state-tracking", quick=True)
    first = state_tracking.plan(cfg, {})
    assert first.waiting and all(r.meta["phase"] == "sweep" for r in first.runs)
    assert [r.meta["lr"] for r in first.runs] == cfg.sweep.lrs
    scores = {0.003: 0.4, 0.01: 0.9}
    finished = {r.id: _record(r, _cells("parity", cfg.sweep.eval_lengths, scores[r.meta["lr"]])) for r in first.runs}
    lr, table = state_tracking.choose_lr(cfg, finished)
    assert lr == 0.01 and [round(s["scaled_accuracy"], 3) for s in table] == [0.4, 0.9]
    second = state_tracking.plan(cfg, finished)
    main_runs = [r for r in second.runs if r.meta["phase"] == "main"]
    assert second.waiting is None and len(main_runs) == len(cfg.models) * len(cfg.tasks)
    for run in main_runs:
        assert run.train_flags[run.train_flags.index("--optimizer.lr") + 1] == "0.01"
        assert run.spec.name.endswith(f"{cfg.layers[run.meta['task']]}layer.yaml")


def test_lr_ties_go_to_the_lower_answer_nll():
    _, cfg = config("state-tracking", quick=True)
    runs = state_tracking.sweep_runs(cfg)
    nll = {0.003: 0.5, 0.01: 0.7}
    finished = {r.id: _record(r, _cells("parity", cfg.sweep.eval_lengths, 1.0, nll[r.meta["lr"]])) for r in runs}
    assert state_tracking.choose_lr(cfg, finished)[0] == 0.003


def test_a_given_lr_skips_the_sweep():
    _, cfg = config("state-tracking", quick=True, train={"lr": 0.002})
    plan = state_tracking.plan(cfg, {})
    assert plan.waiting is None and all(r.meta["phase"] == "main" and r.meta["lr"] == 0.002 for r in plan.runs)


def test_state_tracking_summary_has_every_model_and_task(tmp_path):
    _, cfg = config("state-tracking", quick=True, train={"lr": 0.002})
    runs = state_tracking.plan(cfg, {}).runs
    finished = {r.id: _record(r, _cells(r.meta["task"], cfg.eval.lengths, 0.5)) for r in runs}
    summary = state_tracking.summarize(cfg, finished, tmp_path, [{"date": "d", "device": "cpu"}])
    for entry in cfg.models.values():
        assert entry.label in summary.markdown
    assert all(v == 0.5 for v in summary.data["scaled_accuracy"].values())
    assert len(summary.data["scaled_accuracy"]) == len(cfg.models) * len(cfg.tasks)
    assert {p.name for p in summary.plots} == {"state-tracking.png", "state-tracking-loss.png"}
    assert all(p.stat().st_size > 1000 for p in summary.plots)


def test_out_norm_summary_names_the_best_hybrid_beyond_the_training_length(tmp_path):
    _, cfg = config("out-norm", quick=True)
    runs = out_norm.plan(cfg, {}).runs
    finished = {}
    for r in runs:
        good = 0.8 if r.id == "hybrid-pregate-default" else 0.1
        cells = [{**c, "length_label": label, "task": "niah-1"}
                 for c, label in zip(_cells("niah-1", [96, 192, 384], good), ["1x", "2x", "4x"])]
        cells[0]["accuracy"] = 1.0
        finished[r.id] = _record(r, cells)
    summary = out_norm.summarize(cfg, finished, tmp_path, [])
    assert summary.data["best_hybrid_beyond_train_length"]["niah-1"] == (["hybrid-pregate-default"], 0.8)
    assert "| hybrid, pre-gate default | 100.0 | 80.0 | 80.0 | 80.0 |" in summary.markdown
    assert (tmp_path / "out-norm.png").stat().st_size > 1000


def test_discretization_loss_at_averages_the_window_before_the_step():
    losses = [[s, float(s)] for s in range(10, 1001, 10)]
    assert discretization.loss_at(losses, 1000) == pytest.approx(sum(range(950, 1001, 10)) / 6)
    assert discretization.loss_at(losses, 5) is None


def test_discretization_summary_reports_every_model_and_seed(tmp_path):
    _, cfg = config("discretization", quick=True, seeds=[0, 1])
    runs = discretization.plan(cfg, {}, extra_meta={"corpus_sha256": "x"}).runs
    assert len(runs) == 6 and all(r.meta["corpus_sha256"] == "x" for r in runs)
    finished = {}
    for r in runs:
        cells = [{**c, "length_label": label, "perplexity": 3.0 + r.meta["seed"]}
                 for c, label in zip(_cells("ppl", [64, 128], 0.0), ["1x", "2x"])]
        finished[r.id] = _record(r, cells, losses=[(1, 5.0), (2, 4.0), (3, 3.0)])
    summary = discretization.summarize(cfg, finished, tmp_path, [])
    assert summary.data["perplexity"]["euler@1x"] == pytest.approx(3.5)
    assert "3.500 ± 0.500" in summary.markdown
    assert {p.name for p in summary.plots} == {"discretization-loss.png", "discretization-ppl.png"}


def test_results_store_keeps_finished_runs_by_key(tmp_path):
    store = ResultStore(tmp_path, "out-norm", "t")
    store.put({"id": "a", "key": "k1", "status": "done"})
    store.put({"id": "b", "key": "k2", "status": "failed"})
    again = ResultStore(tmp_path, "out-norm", "t")
    assert again.done("a", "k1") and not again.done("a", "changed") and not again.done("b", "k2")
    assert list(again.finished()) == ["a"]
    with pytest.raises(StudyError, match="belongs to study"):
        ResultStore(tmp_path, "state-tracking", "t")
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(StudyError, match="not valid JSON"):
        ResultStore(tmp_path, "out-norm", "t")


def test_run_key_changes_with_the_spec(tmp_path):
    spec, recipe = tmp_path / "s.yaml", tmp_path / "r.toml"
    spec.write_text("a"), recipe.write_text("r")
    run = Run("x", spec, ["--training.steps", "3"], EvalRequest("parity", "8"), 3, 10, {"model": "m"})
    key = run.key(recipe)
    assert run.key(recipe) == key
    spec.write_text("b")
    assert run.key(recipe) != key


def test_train_log_parsing():
    text = ("[hybridlm] step:  1  loss:  5.56511  grad_norm: 11.6837  memory: 0GiB  tps: 1,410  tflops: 0.00\n"
            "noise\n[hybridlm] step: 10  loss:  3.71542  grad_norm:  5.6161  tps: 9,883  mfu: 0.00%\n")
    parsed = parse_train_log(text)
    assert parsed == {"losses": [[1, 5.56511], [10, 3.71542]], "tokens_per_second": 9883.0}


def test_cli_dry_run_lists_runs_and_commands(capsys):
    assert main(["study", "discretization", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trapezoid-seed0" in out and "hybridlm train specs/studies/discretization/mamba3-trapezoid.yaml" in out
    assert "planned GPU wall time" in out


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["study", "out-norm", "--quick", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "--only nope" in capsys.readouterr().err
    assert main(["study", "out-norm", "--max-minutes", "0"]) == 2
    assert main(["study", "out-norm", "--set", "train.steps=-1"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert main(["study", "nope"]) == 2  # argparse's error, as one line too
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_summarize_without_runs_says_so(capsys, tmp_path):
    assert main(["study", "out-norm", "--summarize", "--out", str(tmp_path)]) == 0
    assert "no finished runs" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists() or json.loads((tmp_path / "results.json").read_text())


def test_commit_record_takes_the_environment_override(monkeypatch):
    """A GPU machine's copy of the tree may hold stale git metadata; HYBRIDLM_COMMIT names the real one."""
    from hybridlm.studies.results import git_commit

    monkeypatch.setenv("HYBRIDLM_COMMIT", "f1e61cd")
    assert git_commit() == "f1e61cd"
    monkeypatch.delenv("HYBRIDLM_COMMIT")
    assert git_commit() != "f1e61cd"
