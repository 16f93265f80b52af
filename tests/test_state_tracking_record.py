"""The trimmed record of a paper-protocol run folder (hybridlm.studies.state_tracking_record)."""
import json

from hybridlm.studies.state_tracking_record import main


def write_run(folder, name, steps, learned_from):
    history = [{"step": s, "scaled_accuracy@256": 0.5 if s >= learned_from else 0.01 + 1 / 3 * 1e-3,
                "diagnostics": [{"layer": 0, "decay": [1 / 3]}]} for s in range(0, steps + 1, 100)]
    progress = {"status": "paused", "step": str(steps), "best": {"step": learned_from}, "slices": [],
                "losses": [[s, 2 / 3] for s in range(100, steps + 1, 100)], "history": history}
    (folder / "work" / name).mkdir(parents=True)
    (folder / "work" / name / "progress.json").write_text(json.dumps(progress))


def test_record_keeps_the_cadence_every_learned_evaluation_and_rounds(tmp_path):
    folder = tmp_path / "study"
    write_run(folder, "paper-official-mixer-parity-d32-lr0.0001", 2000, learned_from=1700)
    write_run(folder, "paper-real-mixer-parity-d32-lr0.0001", 0, learned_from=10**9)  # not started
    write_run(folder, "paper-mamba3-mixer-parity-d32-lr0.0001", 1000, learned_from=10**9)
    out = tmp_path / "record.json"
    main([str(folder), str(out), "--device", "cpu", "--command", "x", "--only", "official-mixer,real-mixer",
          "--every", "500", "--diagnostics-every", "1000"])
    record = json.loads(out.read_text())
    assert list(record["runs"]) == ["paper-official-mixer-parity-d32-lr0.0001"]  # filtered, unstarted dropped
    run = record["runs"]["paper-official-mixer-parity-d32-lr0.0001"]
    assert [h["step"] for h in run["history"]] == [0, 500, 1000, 1500, 1700, 1800, 1900, 2000]
    assert [h["step"] for h in run["history"] if "diagnostics" in h] == [0, 1000, 2000]
    assert run["history"][0]["scaled_accuracy@256"] == 0.01033 and run["history"][0]["diagnostics"][0]["decay"] == [
        0.3333]
    assert [pair[0] for pair in run["losses"]] == [500, 1000, 1500, 2000] and run["losses"][0][1] == 0.6667
    assert run["step"] == 2000 and record["commands"] == ["x"]
