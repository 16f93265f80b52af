"""Hostile inputs to training data, spec files and resumes: one clear error, fast, nothing overwritten."""
import json
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("torchtitan")

import hybridlm  # noqa: E402
from hybridlm.errors import HybridLMError, SpecError  # noqa: E402
from hybridlm.eval.tasks import make_task  # noqa: E402
from hybridlm.layouts import ModelSpec, load_spec, spec_from_yaml  # noqa: E402
from hybridlm.layouts.io import MAX_SPEC_BYTES  # noqa: E402
from hybridlm.titan.data import TextRows, build_rows  # noqa: E402
from hybridlm.titan.trainer import (RUN_RECORD, HybridTrainer, check_resume_spec,  # noqa: E402
                                    spec_differences, write_run_record)

BYTE = hybridlm.ByteTokenizer()
DEMO = "specs/demo/hybrid-demo.yaml"
TINY = "vocab_size: 8\nd_model: 8\nblocks: {M: {kind: swiglu, hidden: 8}}\npattern: M\n"


def first_row_or_error(dataset, timeout: float = 30.0):
    """The first row, or the exception it raised; a hang fails the test instead of blocking it."""
    result = {}

    def run():
        try:
            result["row"] = next(iter(dataset))
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"no row and no error after {timeout} s: the data loop spins"
    return result.get("error", result.get("row"))


def one_line_error(err) -> str:
    assert isinstance(err, HybridLMError), repr(err)
    message = str(err)
    assert "\n" not in message and len(message) < 600, message
    return message


# -- empty and malformed data sources --------------------------------------------------------------

@pytest.mark.parametrize("name, text", [("empty.txt", ""), ("data.jsonl", '{"text": ""}\n')])
def test_a_file_of_empty_documents_is_an_error_naming_it(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    message = one_line_error(first_row_or_error(TextRows(str(path), BYTE, 16)))
    assert str(path) in message and "1 document(s) are all empty" in message


def test_folder_of_empty_files_is_an_error_naming_it(tmp_path):
    for name in ("a.txt", "b.md", "c.jsonl"):
        (tmp_path / name).write_text("")
    message = one_line_error(first_row_or_error(TextRows(str(tmp_path), BYTE, 16)))
    assert str(tmp_path) in message and "2 document(s) are all empty" in message


def test_jsonl_of_blank_lines_has_no_documents(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n\n  \n")
    message = one_line_error(first_row_or_error(TextRows(str(path), BYTE, 16)))
    assert "has no documents" in message


@pytest.mark.parametrize("line, problem", [
    (b"{not json", "not valid JSON"),
    (b'["a list"]', "must be an object with a 'text' field, got a list"),
    (b'"text"', "must be an object with a 'text' field, got a str"),
    (b'{"body": "x"}', "needs a 'text' string (no 'text' field)"),
    (b'{"text": 42}', "needs a 'text' string ('text' is a int)"),
    (b'{"text": "\xff"}', "not UTF-8 text"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a good first document"}\n\n' + line + b"\n")
    message = one_line_error(first_row_or_error(TextRows(str(path), BYTE, 64)))
    assert message.startswith(f"{path}:3: ") and problem in message


def test_device_file_as_data_is_refused():
    message = one_line_error(first_row_or_error(TextRows("/dev/zero", BYTE, 16)))
    assert message == "hybrid.data='/dev/zero' is not a regular file or a folder"


def test_resume_past_a_whole_pass_is_not_mistaken_for_empty_data(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    dataset = TextRows(str(tmp_path), BYTE, 4)
    dataset.load_state_dict({"doc_index": 5, "buffer": [], "buffer_starts": []})  # 2.5 passes consumed
    inputs, _ = first_row_or_error(dataset)
    assert bytes(inputs["input"].tolist()) == b"beta"  # document 5 is b.txt


def test_loss_on_must_be_answers_or_all():
    config = SimpleNamespace(hybrid=SimpleNamespace(data="task:parity", loss_on="banana", seed=0, curriculum=False),
                             training=SimpleNamespace(seq_len=64, steps=8, local_batch_size=2))
    with pytest.raises(HybridLMError) as err:
        build_rows(config, BYTE)
    assert str(err.value) == "--hybrid.loss_on 'banana': choose one of answers, all"


# -- ppl:file= ---------------------------------------------------------------------------------------

def _ppl_error(path) -> str:
    with pytest.raises(HybridLMError) as err:
        task = make_task(f"ppl:file={path}", BYTE)
        task.example(64, None, 0, 1)
    return one_line_error(err.value)


def test_ppl_file_problems_are_named(tmp_path):
    assert _ppl_error("/dev/zero") == ("task ppl: file='/dev/zero' is not a regular file (a device, pipe or "
                                       "socket); name a text file")
    assert _ppl_error(tmp_path) == f"task ppl: file={str(tmp_path)!r} is a folder; name a text file in it"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert _ppl_error(empty) == f"task ppl: file={str(empty)!r} is empty; it needs text to score"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    assert _ppl_error(latin1) == (f"task ppl: file={str(latin1)!r} is not UTF-8 text (byte 3 is b'\\xe9'); "
                                  f"give a UTF-8 text file")
    assert _ppl_error(tmp_path / "nope.txt").endswith("does not exist")


# -- bounded spec errors --------------------------------------------------------------------------

def test_spec_error_shortens_a_huge_value():
    start = time.monotonic()
    message = str(SpecError("name", "must be a string", "x" * 10_000_000))
    assert time.monotonic() - start < 1.0
    assert message == f"name = {'x' * 200!r}... (10000000 characters): must be a string"


def test_ten_megabyte_pattern_fails_fast_and_short():
    for pattern in ("M " * 5_000_000, "Q" * 10_000_000, "(" * 10_000_000, "M *" + "9" * 10_000_000):
        start = time.monotonic()
        with pytest.raises(SpecError) as err:
            ModelSpec(vocab_size=8, d_model=8, blocks={"M": {"kind": "swiglu", "hidden": 8}}, pattern=pattern)
        assert time.monotonic() - start < 1.0, pattern[:10]
        message = one_line_error(err.value)
        assert message.startswith("pattern = ") and "characters)" in message


def test_huge_repeat_count_is_a_pattern_error():
    with pytest.raises(SpecError, match=r"expands to more than 100000 blocks \(column 4\)"):
        ModelSpec(vocab_size=8, d_model=8, blocks={"M": {"kind": "swiglu", "hidden": 8}}, pattern="M *" + "9" * 5000)


def test_yaml_alias_bomb_bound_to_name_fails_fast():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    text = "\n".join(lines) + "\nname: *i\n" + TINY
    start = time.monotonic()
    with pytest.raises(SpecError) as err:
        spec_from_yaml(text, "bomb.yaml")
    assert time.monotonic() - start < 1.0
    assert str(err.value) == ("<spec>: bomb.yaml expands to more than 1,000,000 YAML nodes once its aliases (*name) "
                              "are expanded; write the spec out without repeated aliases")


def test_a_few_aliases_still_work():
    text = "blocks:\n  M: &ffn {kind: swiglu, hidden: 8}\n  F: *ffn\nvocab_size: 8\nd_model: 8\npattern: M F\n"
    assert spec_from_yaml(text).n_blocks == 2


def test_recursive_alias_and_deep_nesting_are_spec_errors():
    with pytest.raises(SpecError, match="r.yaml holds a recursive YAML alias"):
        spec_from_yaml("name: &a [*a]\n", "r.yaml")
    with pytest.raises(SpecError, match="d.yaml nests YAML lists or mappings too deeply"):
        spec_from_yaml("[" * 100_000, "d.yaml")
    with pytest.raises(SpecError, match="a mapping key must be a plain value, not a list, at line 1, column 3"):
        spec_from_yaml("? [1]\n: 2\n", "k.yaml")


def test_spec_document_size_is_capped(tmp_path):
    with pytest.raises(SpecError) as err:
        spec_from_yaml("name: " + "x" * MAX_SPEC_BYTES, "big.yaml")
    assert "big.yaml is 1,048,582 characters, more than the 1,048,576 a spec may have" in str(err.value)
    with pytest.raises(SpecError, match=r"spec file '/dev/zero' is larger than 1,048,576 bytes"):
        load_spec("/dev/zero")


def test_non_utf8_spec_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(("name: caf\u00e9\n" + TINY).encode("latin-1"))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value) == (f"<spec>: spec file {str(path)!r} is not UTF-8 text (byte 9 is b'\\xe9'): "
                              f"save it as UTF-8")


def test_cli_validate_of_a_non_utf8_spec_is_one_line_and_exit_2(tmp_path, capsys):
    from hybridlm.cli.main import main

    path = tmp_path / "latin1.yaml"
    path.write_bytes(("name: caf\u00e9\n" + TINY).encode("latin-1"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not UTF-8 text" in err and str(path) in err


# -- resume checks the spec; the run record follows the checkpoint load ----------------------------

def job(dump, spec=DEMO, allow=False):
    return SimpleNamespace(
        job=SimpleNamespace(dump_folder=str(dump)), checkpoint=SimpleNamespace(folder="checkpoint"),
        hybrid=SimpleNamespace(spec=spec, allow_spec_change=allow, tokenizer="byte", data="task:mqar",
                               loss_on="answers", seed=0),
        training=SimpleNamespace(seq_len=64, steps=8))


def record_run(dump, spec=DEMO, step=2):
    """A dump folder as a run leaves it: the record and a step-N checkpoint folder."""
    model_args = SimpleNamespace(spec=hybridlm.load_spec(spec).to_dict(exclude_defaults=False), spec_source=spec)
    write_run_record(job(dump, spec), model_args, None)
    if step is not None:
        (dump / "checkpoint" / f"step-{step}").mkdir(parents=True)
        (dump / "checkpoint" / f"step-{step}" / ".metadata").write_bytes(b"")
    return (dump / RUN_RECORD).read_text()


@pytest.fixture
def rope_spec(tmp_path):
    path = tmp_path / "rope.yaml"
    path.write_text(open(DEMO).read().replace("position: nope", "position: rope")
                    .replace("out_norm: pregate_grouped", "out_norm: none"))
    return path


def test_resume_with_another_spec_stops_naming_the_fields(tmp_path, rope_spec):
    dump = tmp_path / "dump"
    before = record_run(dump)
    with pytest.raises(HybridLMError) as err:
        check_resume_spec(job(dump, str(rope_spec)))
    message = one_line_error(err.value)
    assert message == (
        f"{dump} holds checkpoints up to step-2 of another spec (hybridlm_run.json); resuming with --hybrid.spec "
        f"{rope_spec} would change blocks.M.out_norm: 'pregate_grouped' -> 'none'; blocks.A.position: 'nope' -> "
        f"'rope'. Train into a new --job.dump_folder, or pass --hybrid.allow_spec_change to resume with the new "
        f"spec anyway")
    assert (dump / RUN_RECORD).read_text() == before


def test_resume_with_the_same_spec_or_the_override_flag_goes_on(tmp_path, rope_spec):
    dump = tmp_path / "dump"
    record_run(dump)
    assert check_resume_spec(job(dump)) == []
    assert check_resume_spec(job(dump, str(rope_spec), allow=True)) == ["blocks.M.out_norm", "blocks.A.position"]


def test_no_checkpoint_yet_is_a_fresh_run(tmp_path, rope_spec):
    dump = tmp_path / "dump"
    record_run(dump, step=None)
    (dump / "checkpoint" / "step-4").mkdir(parents=True)  # an interrupted save: no .metadata
    assert check_resume_spec(job(dump, str(rope_spec))) == []


def test_unreadable_record_on_resume_is_one_error(tmp_path):
    dump = tmp_path / "dump"
    record_run(dump)
    (dump / RUN_RECORD).write_text("{truncated")
    with pytest.raises(HybridLMError, match="hybridlm_run.json cannot be read .* pass --hybrid.allow_spec_change"):
        check_resume_spec(job(dump))


def test_spec_differences_are_dotted_paths():
    old = {"d_model": 128, "blocks": {"A": {"position": "nope"}}, "overrides": [{"at": [0]}]}
    new = {"d_model": 64, "blocks": {"A": {"position": "nope"}, "B": {}}, "overrides": [{"at": [1]}]}
    assert [p for p, _, _ in spec_differences(old, new)] == ["d_model", "blocks.B", "overrides.0.at.0"]


class FakeCheckpointer:
    def __init__(self, error=None):
        self.error = error

    def load(self, step=-1):
        if self.error:
            raise self.error
        return True


def trainer_with(dump, checkpointer, spec_changed=()):
    """A HybridTrainer shell: only what wrapping ``checkpointer.load`` needs, no torchtitan setup."""
    trainer = HybridTrainer.__new__(HybridTrainer)
    trainer.job_config = job(dump)
    trainer.model_args = SimpleNamespace(spec={"name": "new"}, spec_source="new.yaml")
    trainer.tokenizer, trainer.checkpointer, trainer._spec_changed = None, checkpointer, list(spec_changed)
    trainer._record_after_load()
    return trainer


def test_run_record_is_written_after_the_checkpoint_loads(tmp_path):
    dump = tmp_path / "dump"
    before = record_run(dump)
    trainer = trainer_with(dump, FakeCheckpointer(ValueError("Size mismatch for layers.0")))
    with pytest.raises(ValueError):
        trainer.checkpointer.load(step=-1)
    assert (dump / RUN_RECORD).read_text() == before  # the old run can still be exported
    trainer = trainer_with(dump, FakeCheckpointer())
    assert trainer.checkpointer.load(step=-1) is True
    assert json.loads((dump / RUN_RECORD).read_text())["spec"] == {"name": "new"}


def test_allowed_spec_change_that_does_not_fit_is_one_line(tmp_path):
    dump = tmp_path / "dump"
    before = record_run(dump)
    error = ValueError("Traceback...\nValueError: Size mismatch between saved torch.Size([8]) and current")
    trainer = trainer_with(dump, FakeCheckpointer(error), spec_changed=["d_model"])
    with pytest.raises(HybridLMError) as err:
        trainer.checkpointer.load(step=-1)
    assert one_line_error(err.value) == (
        f"the checkpoint in {dump} does not fit the new spec (--hybrid.allow_spec_change allowed d_model): "
        f"ValueError: Size mismatch between saved torch.Size([8]) and current. Only changes that keep every "
        f"tensor's shape can resume; train into a new --job.dump_folder (hybridlm_run.json is unchanged)")
    assert (dump / RUN_RECORD).read_text() == before


def test_allow_spec_change_is_a_hybrid_flag():
    from torchtitan.config import ConfigManager

    base = ["--job.custom_config_module", "hybridlm.titan.job_config"]
    assert ConfigManager().parse_args(base).hybrid.allow_spec_change is False
    assert ConfigManager().parse_args(base + ["--hybrid.allow_spec_change"]).hybrid.allow_spec_change is True


def test_refused_resume_through_the_launcher_keeps_the_record(tmp_path, rope_spec):
    """End to end on CPU: train 2 steps, resume with another spec -> exit 2, one line, record untouched."""
    import os
    import subprocess
    import sys

    dump = tmp_path / "dump"
    flags = [sys.executable, "-m", "hybridlm.titan.launch", "--job.config_file", "specs/train/cpu-debug.toml",
             "--training.seq_len", "32", "--training.local_batch_size", "2", "--training.steps", "2",
             "--checkpoint.interval", "2", "--hybrid.data", "task:mqar:pairs=2", "--job.dump_folder", str(dump)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(flags + ["--hybrid.spec", DEMO], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (dump / RUN_RECORD).read_text()
    again = subprocess.run(flags + ["--hybrid.spec", str(rope_spec)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2, again.stderr[-2000:]
    errors = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "blocks.A.position: 'nope' -> 'rope'" in errors[0]
    assert (dump / RUN_RECORD).read_text() == before
