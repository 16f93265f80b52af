"""Hostile command lines (issue 20): one line `error: ...`, exit 2 (130 for Ctrl-C), before any work."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridlm.builder import account, build_model
from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.cli import main as cli
from hybridlm.cli.main import main
from hybridlm.layouts import dump_spec, load_spec
from hybridlm.layouts.presets import PRESETS, get_preset

ROOT = Path(__file__).resolve().parents[1]
DEMO = "specs/demo/hybrid-demo.yaml"
EVAL = ["eval", "tiny-hybrid", "--task", "mqar:pairs=2", "--lengths", "32", "--samples", "2", "--quiet", "--no-plot"]
GEN = ["generate", "tiny-hybrid", "--prompt", "hi"]


def _one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _fails(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return _one_error_line(captured.err, *needles)


def _spec_file(tmp_path, **changes) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(dump_spec(get_preset("tiny-hybrid").model_copy(update=changes)))
    return str(path)


@pytest.mark.parametrize("argv,needles", [
    (EVAL + ["--samples", "0"], ["--samples", "positive integer, got 0"]),
    (EVAL + ["--samples", "-1"], ["--samples", "got -1"]),
    (EVAL + ["--batch-size", "0"], ["--batch-size", "got 0"]),
    (EVAL + ["--train-len", "0"], ["--train-len", "got 0"]),
    (EVAL + ["--device", "banana"], ["--device", "'banana' is not a device"]),
    (GEN + ["--max-new-tokens", "-1"], ["--max-new-tokens", "got -1"]),
    (GEN + ["--max-new-tokens", "0"], ["--max-new-tokens", "got 0"]),
    (GEN + ["--temperature", "-1"], ["--temperature", "finite number >= 0", "got -1"]),
    (GEN + ["--temperature", "nan"], ["--temperature", "got nan"]),
    (GEN + ["--temperature", "inf"], ["--temperature", "got inf"]),
    (GEN + ["--top-k", "-3"], ["--top-k", ">= 0, got -3"]),
    (["show", "tiny-hybrid", "--seq-len", "-100"], ["--seq-len", "got -100"]),
    (["show", "tiny-hybrid", "--context", "0"], ["--context", "got 0"]),
    (["train", DEMO, "--nproc", "0"], ["--nproc", "got 0"]),
    (["eval", "tiny-hybrid", "--task", "mqar"], ["required: --lengths"]),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, needles):
    line = _fails(capsys, argv, *needles)
    assert f"hybridlm {argv[0]} --help" in line


def test_cuda_device_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _fails(capsys, EVAL + ["--device", "cuda"], "--device", "no CUDA device", "--device cpu")


def test_eval_out_naming_a_file_fails_before_scoring(tmp_path, capsys, monkeypatch):
    import hybridlm.eval as hybridlm_eval

    monkeypatch.setattr(hybridlm_eval, "evaluate", lambda *a, **k: pytest.fail("scored before checking --out"))
    target = tmp_path / "results"
    target.write_text("mine")
    _fails(capsys, EVAL + ["--out", str(target)], f"--out {target}: is a file")
    assert target.read_text() == "mine"


def test_eval_out_under_a_file_fails(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    _fails(capsys, EVAL + ["--out", str(tmp_path / "f" / "sub")], "is a file, not a folder")


def test_schema_out_naming_a_folder(tmp_path, capsys):
    _fails(capsys, ["schema", "--out", str(tmp_path)], "is a folder; name a file", "schema.json")


def test_schema_out_makes_missing_parents(tmp_path, capsys):
    assert main(["schema", "--out", str(tmp_path / "a" / "s.json")]) == 0
    assert "properties" in json.loads((tmp_path / "a" / "s.json").read_text())


def test_export_out_naming_a_file(tmp_path, capsys):
    target = tmp_path / "model"
    target.write_text("mine")
    _fails(capsys, ["export", str(tmp_path / "no-checkpoint"), "--out", str(target)], "--out", "is a file")
    assert target.read_text() == "mine"


def test_generate_refuses_a_cache_that_cannot_fit(capsys):
    _fails(capsys, GEN + ["--max-new-tokens", "1000000000"], "generating 1000000000 tokens", "needs about 95",
           "lower --max-new-tokens")  # 953.68 GiB of cache


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_huge_vocabulary_is_refused_with_the_estimate(tmp_path, capsys, command):
    spec = _spec_file(tmp_path, vocab_size=2**40)
    argv = [command, spec, "--prompt", "hi"] if command == "generate" else [*EVAL[:1], spec, *EVAL[2:]]
    _fails(capsys, argv, "needs about", "TiB", "more than the")


@pytest.mark.parametrize("command", ["generate", "eval", "show"])
def test_huge_d_model_is_refused(tmp_path, capsys, command):
    spec = _spec_file(tmp_path, d_model=2**40)
    argv = {"generate": ["generate", spec, "--prompt", "hi"], "eval": [*EVAL[:1], spec, *EVAL[2:]],
            "show": ["show", spec, "--summary"]}[command]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, f"d_model {2**40}", "too large")


def test_eval_refuses_a_billion_token_length(capsys, tmp_path):
    started = time.monotonic()
    _fails(capsys, [*EVAL[:4], "--lengths", "1000000000", "--out", str(tmp_path)],
           "batches of 8 x 1000000000 tokens", "needs about", "use shorter --lengths")
    assert time.monotonic() - started < 30


def test_decoder_refuses_a_cache_that_cannot_fit():
    from hybridlm.builder.inference.decoder import Decoder
    from hybridlm.errors import HybridLMError

    model = build_model(get_preset("tiny-hybrid"))
    with pytest.raises(HybridLMError, match=r"decode cache of 1 x 1000000000 tokens needs about .* more than"):
        Decoder(model, 1, 10**9)


def test_account_of_a_spec_matches_the_built_model():
    for name in PRESETS:
        spec = get_preset(name)
        assert account(spec, seq_len=300, context=77) == account(HybridLM(spec, device="meta"), seq_len=300,
                                                                 context=77), name


def test_show_of_99998_blocks_answers_in_seconds(tmp_path, capsys):
    text = "vocab_size: 256\nd_model: 64\nblocks:\n  M: {kind: mamba3, d_state: 16, headdim: 16}\n  F: {kind: swiglu}\n"
    path, pair = tmp_path / "long.yaml", tmp_path / "pair.yaml"
    path.write_text(text + "pattern: (M F) *49999\n")
    pair.write_text(text + "pattern: M F\n")
    small = account(load_spec(pair))
    started = time.monotonic()
    assert main(["show", str(path)]) == 0
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert out.startswith("hybrid: d_model 64, vocab 256, 99998 blocks, pattern (M F) *49999")
    per_pair = small.total_params - small.embedding_params - 64  # one M F pair without embedding and final norm
    assert f"parameters        {small.embedding_params + 64 + 49999 * per_pair:,} (" in out
    assert elapsed < 60, elapsed


def _model_folder(tmp_path) -> Path:
    from hybridlm.builder.io.pretrained import save_pretrained

    return save_pretrained(build_model(get_preset("tiny-hybrid"), seed=3), tmp_path / "model", train_seq_len=64)


def test_generate_takes_a_model_folder(tmp_path, capsys):
    folder = _model_folder(tmp_path)
    argv = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"({folder}) 'hi' -> ")
    ids = json.loads(out.splitlines()[-1].split(":", 1)[1])
    import hybridlm
    import torch

    loaded = hybridlm.load(folder)
    expected = loaded.model.generate(torch.tensor([[104, 105]]), 4, temperature=0)[0, 2:].tolist()
    assert ids == expected  # the folder's weights, not random ones


def test_generate_on_a_plain_folder(tmp_path, capsys):
    _fails(capsys, ["generate", str(tmp_path), "--prompt", "hi"], "not a hybridlm model folder")


def test_generate_out_of_vocabulary_ids_are_one_error(capsys, monkeypatch):
    from hybridlm.tokenizer import ByteTokenizer

    monkeypatch.setattr(ByteTokenizer, "encode", lambda self, text: [1000])
    _fails(capsys, GEN, "token id 1000", "outside the model's vocab_size 256")


def test_validate_checks_every_file_and_names_the_failed_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: [1\n")
    missing = tmp_path / "missing.yaml"
    assert main(["validate", "tiny-hybrid", str(bad), str(missing), "hybrid-1.5b"]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["ok  tiny-hybrid: tiny-hybrid, 16 blocks",
                                         "ok  hybrid-1.5b: hybrid-1.5b, 48 blocks"]
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {bad}: invalid spec:") and "YAML syntax error" in errors[0]
    assert errors[1].startswith(f"error: {missing}:") and "cannot read" in errors[1]


def test_ctrl_c_is_one_line_and_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_show", interrupted)
    assert main(["show", "tiny-hybrid"]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted (Ctrl-C)"


# -- the training launcher: torchtitan in subprocesses (it patches torch for CPU once per process) ------

def _titan_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_launcher_config_errors_are_one_line(tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[training\nsteps = 3\n")
    script = f"""
import json
from hybridlm.errors import HybridLMError
from hybridlm.titan.launch import check_config, with_defaults
base = ["--job.config_file", "specs/train/cpu-debug.toml", "--hybrid.spec", "{DEMO}"]
cases = [["--training.steps", "-1"], ["--bogus.flag", "3"], ["--checkpoint.enable", "false"],
         ["--training.steps", "abc"], ["--job.config_file", "{bad_toml}"],
         ["--job.config_file", "{tmp_path / 'none.toml'}"], ["--training.steps", "3"]]
out = []
for extra in cases:
    try:
        check_config(with_defaults(base + extra))
        out.append("ok")
    except HybridLMError as err:
        out.append(str(err))
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_titan_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr  # no tyro box, no logged traceback
    steps, unknown, boolean, not_int, toml, none, fine = json.loads(proc.stdout.strip().splitlines()[-1])
    assert steps == "--training.steps must be at least 1, got -1"
    assert unknown == "Unrecognized options: --bogus.flag, 3"
    assert boolean.startswith("Unrecognized options: false; boolean flags take no value")
    assert "--checkpoint.no-enable" in boolean
    assert "--training.steps" in not_int and "'abc'" in not_int
    assert toml.startswith(f"--job.config_file {bad_toml}: TOML syntax error") and "line 1" in toml
    assert none.startswith(f"--job.config_file {tmp_path / 'none.toml'}: cannot read it")
    assert fine == "ok"


def _hybridlm_train(tmp_path, *flags, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hybridlm", "train", DEMO, "--job.dump_folder", str(tmp_path / "dump"),
           "--training.seq_len", "64", "--training.local_batch_size", "2", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=_titan_env(), capture_output=True, text=True, timeout=timeout)


def test_train_bad_flag_is_one_line_exit_2(tmp_path):
    proc = _hybridlm_train(tmp_path, "--training.steps", "-1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    _one_error_line(proc.stderr, "--training.steps must be at least 1, got -1")


def test_train_data_error_is_one_line_exit_2(tmp_path):
    proc = _hybridlm_train(tmp_path, "--training.steps", "2", "--hybrid.loss_on", "banana")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    _one_error_line(proc.stderr, "--hybrid.loss_on", "banana")


def test_train_ctrl_c_exits_130_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "hybridlm", "train", DEMO, "--job.dump_folder", str(tmp_path / "dump"),
           "--training.seq_len", "128", "--training.local_batch_size", "2", "--training.steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_titan_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if re.search(r"\bstep +\d+/\d+", line):  # a logged training step
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    _one_error_line(err, "interrupted (Ctrl-C)")
