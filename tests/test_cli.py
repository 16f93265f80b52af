"""The command line, in-process (and once as a subprocess)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybridlm.builder import account
from hybridlm.cli.main import main
from hybridlm.layouts import dump_spec
from hybridlm.layouts.presets import PRESETS, get_preset

ROOT = Path(__file__).resolve().parents[1]

BAD_SPEC = """\
vocab_size: 256
d_model: 128
blocks:
  M: {kind: mamba3, d_state: 32, headdim: 48}
  F: {kind: swiglu}
pattern: (M F) *2
"""


def _table_rows(out):
    """Rows of the block table: lines starting with an index."""
    return [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+\S+\s+(mamba3|attention|swiglu)\s", line)]


def test_show_yaml_file(tmp_path, capsys):
    spec = get_preset("tiny-hybrid")
    path = tmp_path / "model.yaml"
    path.write_text(dump_spec(spec))
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-hybrid: d_model 128, vocab 256, 16 blocks, pattern ((M F) *3 A F) *2")
    assert re.search(r"#\s+sym\s+kind\s+params", out)
    rows = _table_rows(out)
    assert [int(r[0]) for r in rows] == list(range(16))
    assert [r[1] for r in rows] == list("MFMFMFAF") * 2
    assert "N=16" in out and "N=32" in out  # the override shows in the table
    total = account(spec).total_params
    assert f"parameters        {total:,} (" in out


def test_show_preset_name(capsys):
    assert main(["show", "mamba3-1.5b"]) == 0
    out = capsys.readouterr().out
    assert "parameters        1,494,723,584 (1.49B)" in out
    assert len(_table_rows(out)) == 48


def test_show_summary_has_no_table(capsys):
    assert main(["show", "transformer-tiny", "--summary", "--seq-len", "512", "--context", "100"]) == 0
    out = capsys.readouterr().out
    assert _table_rows(out) == []
    assert "at seq_len 512" in out and "at 100 tokens" in out
    assert f"{account(get_preset('transformer-tiny')).total_params:,}" in out


def test_validate_ok(capsys):
    files = [str(ROOT / "specs" / "tiny-hybrid.yaml"), "hybrid-1.5b"]
    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok  {files[0]}: tiny-hybrid, 16 blocks", "ok  hybrid-1.5b: hybrid-1.5b, 48 blocks"]


def test_schema_out_file(tmp_path, capsys):
    path = tmp_path / "schema.json"
    assert main(["schema", "--out", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {path}"  # says what it wrote, nothing else
    schema = json.loads(path.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/")
    mapping = schema["properties"]["blocks"]["additionalProperties"]["discriminator"]["mapping"]
    assert {"mamba3", "attention", "swiglu"} <= set(mapping)


def test_schema_stdout(capsys):
    assert main(["schema"]) == 0
    assert "oneOf" in json.loads(capsys.readouterr().out)["properties"]["blocks"]["additionalProperties"]


def test_presets_lists_all(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert "1.49B" in next(line for line in lines if line.startswith("mamba3-1.5b "))


def _generate(capsys):
    code = main(["generate", "tiny-hybrid", "--prompt", "hi", "--max-new-tokens", "5", "--temperature", "0",
                 "--seed", "0"])
    assert code == 0
    return capsys.readouterr().out


def test_generate_is_deterministic(capsys):
    first = _generate(capsys)
    second = _generate(capsys)
    assert first == second
    ids_line = next(line for line in first.splitlines() if line.startswith("new token ids:"))
    ids = json.loads(ids_line.split(":", 1)[1])
    assert len(ids) == 5 and all(isinstance(i, int) and 0 <= i < 256 for i in ids)
    assert "'hi' ->" in first


def test_generate_seed_matters_with_sampling(capsys):
    outs = set()
    for seed in range(3):
        assert main(["generate", "tiny-hybrid", "--prompt", "hi", "--max-new-tokens", "8", "--seed", str(seed)]) == 0
        outs.add(capsys.readouterr().out.splitlines()[-1])
    assert len(outs) > 1


def _assert_one_error_line(err, path):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert path in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["validate", "show", "generate"])
def test_invalid_spec_exits_2_without_traceback(tmp_path, capsys, command):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SPEC)
    argv = [command, str(bad)] + (["--prompt", "hi"] if command == "generate" else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    _assert_one_error_line(captured.err, "blocks.M.headdim")
    assert "48" in captured.err


@pytest.mark.parametrize("text,path", [
    ("d_model: [1\n", "YAML syntax error"),
    ("", "empty"),
    (BAD_SPEC.replace("pattern: (M F) *2", "pattern: (M F *2"), "pattern"),
    (BAD_SPEC.replace("headdim: 48", "headdim: 32").replace("{kind: swiglu}", "{kind: swiglu, hidden: yes}"),
     "blocks.F.hidden"),
])
def test_other_invalid_specs_exit_2(tmp_path, capsys, text, path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["validate", str(bad)]) == 2
    _assert_one_error_line(capsys.readouterr().err, path)


def test_unknown_spec_name_and_missing_file(tmp_path, capsys):
    assert main(["show", "no-such-preset"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "neither a spec file nor a preset")
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    _assert_one_error_line(capsys.readouterr().err, "cannot read")


def test_generate_refuses_a_small_vocabulary(tmp_path, capsys):
    path = tmp_path / "small.yaml"
    path.write_text(dump_spec(get_preset("tiny-hybrid").model_copy(update={"vocab_size": 100})))
    assert main(["generate", str(path), "--prompt", "hi"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "vocab_size")


def test_subprocess_validate_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SPEC)
    proc = subprocess.run([sys.executable, "-m", "hybridlm", "validate", str(bad)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_one_error_line(proc.stderr, "blocks.M.headdim")
    assert proc.stdout == ""
