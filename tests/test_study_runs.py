"""Each study end to end in its --quick mode: torchtitan training, export, harness evaluation,
results.json, summary and plots; resuming, the time budget and a failing run. Two models per study
keep these to seconds each (`--only`); `hybridlm study NAME --quick` runs them all."""
import json

import pytest

from hybridlm.cli.main import main

pytest.importorskip("torchtitan")


def study(name, out, *args):
    return main(["study", name, "--quick", "--out", str(out), "--jobs", "2", *args])


def results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def state_tracking(tmp_path_factory):
    out = tmp_path_factory.mktemp("state-tracking")
    status = study("state-tracking", out, "--only", "mamba3,real", "--set", 'tasks=["parity"]')
    return status, out


def test_state_tracking_sweeps_trains_and_evaluates_every_model_and_length(state_tracking):
    status, out = state_tracking
    assert status == 0
    doc = results(out)
    runs = doc["runs"]
    assert set(runs) == {"sweep-lr0.003-parity", "sweep-lr0.01-parity", "mamba3-parity", "real-parity"}
    assert all(r["status"] == "done" for r in runs.values())
    lr = doc["summary"]["lr"]
    assert lr in (0.003, 0.01)
    for model in ("mamba3", "real"):
        run = runs[f"{model}-parity"]
        assert sorted(c["length"] for c in run["eval"]) == [8, 16, 32]  # every length of [quick] eval
        assert all(c["task"] == "parity" and c["chance"] == 0.5 and c["examples"] == 16 for c in run["eval"])
        assert [s for s, _ in run["train"]["losses"]] == [1, 2, 3, 4]
        assert f"--optimizer.lr {lr:g}" in run["commands"][0] and run["commands"][0].startswith("hybridlm train")
    assert (out / "state-tracking.png").stat().st_size > 1000
    assert "Mamba-3, rotation off (real)" in (out / "summary.md").read_text()


def test_a_finished_study_runs_nothing_again(state_tracking, capsys):
    _, out = state_tracking
    before = results(out)["runs"]
    capsys.readouterr()
    assert study("state-tracking", out, "--only", "mamba3,real", "--set", 'tasks=["parity"]') == 0
    assert "start " not in capsys.readouterr().out
    assert results(out)["runs"] == before and len(results(out)["sessions"]) == 2


def test_out_norm_evaluates_each_model_at_each_multiple_of_the_training_length(tmp_path):
    assert study("out-norm", tmp_path, "--only", "hybrid-pregate-grouped,transformer") == 0
    runs = results(tmp_path)["runs"]
    assert set(runs) == {"hybrid-pregate-grouped", "transformer"}
    for run in runs.values():
        cells = {(c["task"], c["length_label"]): c for c in run["eval"]}
        assert set(cells) == {(t, n) for t in ("niah-2:digits=4:template=short", "niah-1:digits=4:template=short")
                              for n in ("1x", "2x")}
        assert cells[("niah-1:digits=4:template=short", "2x")]["length"] == 192  # 2 x the training length 96
    assert (tmp_path / "out-norm.png").is_file() and (tmp_path / "out-norm-loss.png").is_file()


def test_discretization_builds_its_corpus_and_reports_perplexity(tmp_path):
    corpus = tmp_path / "corpus"
    assert study("discretization", tmp_path / "out", "--only", "trapezoid,euler", "--set", f'corpus="{corpus}"') == 0
    manifest = json.loads((corpus / "manifest.json").read_text())
    runs = results(tmp_path / "out")["runs"]
    assert set(runs) == {"trapezoid-seed0", "euler-seed0"}
    for run in runs.values():
        assert run["meta"]["corpus_sha256"] == manifest["train"]["sha256"]
        assert {c["length_label"] for c in run["eval"]} == {"1x", "2x"}
        assert all(c["perplexity"] > 1 for c in run["eval"])
        assert f"{corpus}/train.jsonl" in run["commands"][0]
    assert "held-out ppl @ 1x" in (tmp_path / "out" / "summary.md").read_text()


def test_time_budget_postpones_runs_and_says_how_to_continue(tmp_path, capsys):
    assert study("out-norm", tmp_path, "--max-minutes", "0.001") == 3
    out = capsys.readouterr().out
    assert "INCOMPLETE" in out and "run the same command again" in out
    doc = results(tmp_path)
    assert doc["runs"] == {} and doc["sessions"][-1]["complete"] is False


def test_a_failing_run_is_recorded_with_its_error(tmp_path, capsys):
    # A 100-token row cannot hold the curriculum's 162-token examples: training stops with that error.
    status = study("state-tracking", tmp_path, "--only", "mamba3", "--set", 'tasks=["parity"]',
                   "--set", "train.lr=0.01", "--set", "train.seq_len=100")
    assert status == 1
    run = results(tmp_path)["runs"]["mamba3-parity"]
    assert run["status"] == "failed" and "seq_len=100" in run["error"]
    assert "1 run(s) failed" in capsys.readouterr().out
