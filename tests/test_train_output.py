"""What `hybridlm train` and `hybridlm eval` show a person."""
import dataclasses
import re

from hybridlm.cli.main import main
from hybridlm.titan.job_config import Hybrid
from hybridlm.titan.progress import ProgressFormatter, RunFacts

TITAN_STEP = ("\x1b[31mstep: 20  \x1b[32mloss:  3.21400  \x1b[38;2;180;60;0mgrad_norm:  1.9500  "
              "\x1b[38;2;54;234;195mmemory: {mem}GiB(-100.00%)  \x1b[34mtps: 11,234  \x1b[36mtflops: 0.00  "
              "\x1b[35mmfu: {mfu}%\x1b[39m")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def formatter(device="cpu", checkpoints=True):
    facts = RunFacts("tiny-hybrid", 100, device, "runs/x", "runs/x/checkpoint" if checkpoints else None, 25)
    clock = FakeClock()
    return ProgressFormatter(facts, clock=clock), clock


def test_cpu_step_lines_say_how_far_and_how_long_without_unmeasurable_fields():
    fmt, clock = formatter("cpu")
    assert fmt.rewrite("Model hybrid spec size: 1,871,168 total parameters") == (
        "tiny-hybrid: 1,871,168 parameters, 100 steps on cpu; checkpoints every 25 steps and at the end to "
        "runs/x/checkpoint")
    assert fmt.rewrite("Training starts at step 1") is None  # kept as it is
    clock.now = 110.0
    first = fmt.rewrite(TITAN_STEP.format(mem="-0.00", mfu="0.00").replace("step: 20", "step: 10"))
    assert first.startswith("step  10/100   10%  loss 3.21400  grad_norm 1.9500  11,234 tok/s  elapsed 0:10")
    assert "ETA" not in first  # the first logged step also paid for start-up: no rate from it
    clock.now = 130.0
    line = fmt.rewrite(TITAN_STEP.format(mem="-0.00", mfu="0.00"))
    assert line.endswith("elapsed 0:30  ETA 2:40")  # 10 steps took 20 s, 80 remain
    assert not re.search(r"mem|MFU|tflops|GiB", line)
    clock.now = 300.0  # steps past the last logged one are not logged: completed means all 100
    assert fmt.rewrite("Training completed") == (
        "done: 100 steps in 3:20; checkpoints in runs/x/checkpoint; next: hybridlm export runs/x --out models/tiny-hybrid")


def test_gpu_step_lines_add_memory_and_mfu_and_no_checkpoints_is_said():
    fmt, _ = formatter("cuda", checkpoints=False)
    line = fmt.rewrite(TITAN_STEP.format(mem="18.92", mfu="24.91"))
    assert "mem 18.9 GiB" in line and "MFU 24.9%" in line
    assert "checkpoints off" in fmt.rewrite("Model hybrid spec size: 5 total parameters")
    assert "no checkpoints were written" in fmt.rewrite("Training completed")


def test_train_help_lists_every_hybrid_option(capsys):
    try:
        main(["train", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(Hybrid):
        assert f"--hybrid.{field.name} (default {field.default!r})" in out, field.name
    assert "--titan-help" in out


def test_eval_without_a_terminal_prints_a_line_per_cell(capsys, tmp_path):
    assert main(["eval", "hybrid-tiny", "--task", "mqar:pairs=2", "--lengths", "64,96", "--samples", "2",
                 "--out", str(tmp_path), "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"eval 1/2: hybrid-tiny mqar:pairs=2@64 \d+\.\d %", err), err
    assert "eval 2/2: hybrid-tiny mqar:pairs=2@96" in err


def test_schema_out_says_what_it_wrote(capsys, tmp_path):
    assert main(["schema", "--out", str(tmp_path / "s.json")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 's.json'}"


def test_the_step_line_parser_reads_both_forms():
    from hybridlm.titan.progress import STEP_LINE, parse_step_line

    fmt, _ = formatter("cpu")
    ours = fmt.rewrite(TITAN_STEP.format(mem="-0.00", mfu="0.00"))
    titan = "step: 20  loss:  3.21400  grad_norm:  1.9500  memory: 1.00GiB(1%)  tps: 11,234  tflops: 0.1  mfu: 1.0%"
    for line in (ours, titan):
        assert parse_step_line(STEP_LINE.search(line)) == (20, 3.214, 11234.0), line
