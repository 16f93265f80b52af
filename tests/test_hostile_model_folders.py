"""Model folders under attack: saves that must not clobber or half-write, folders damaged or edited
after saving, and bad load arguments. Every failure is one HybridLMError naming the folder and file."""
import inspect
import json
import os
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import hybridlm
from hybridlm.builder import build_model
from hybridlm.builder.io import pretrained as pretrained_mod
from hybridlm.builder.io.pretrained import NonFiniteWeightsWarning, load_pretrained, save_pretrained
from hybridlm.errors import HybridLMError
from hybridlm.eval.harness import load_eval_model
from hybridlm.layouts import load_spec
from hybridlm.layouts.presets import get_preset

TINY = "specs/tiny-hybrid.yaml"


@pytest.fixture
def model():
    return build_model(load_spec(TINY), seed=0).eval()


@pytest.fixture
def folder(model, tmp_path):
    return save_pretrained(model, tmp_path / "m", train_seq_len=128)


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def fails(folder, match, file=None, loader=load_pretrained, **kwargs):
    """The load fails with one HybridLMError that names the folder (and the file)."""
    with pytest.raises(HybridLMError, match=match) as info:
        loader(folder, **kwargs) if loader is load_pretrained else loader(str(folder), **kwargs)
    assert str(folder) in str(info.value)
    if file:
        assert file in str(info.value)
    return str(info.value)


def edit_meta(folder, **changes):
    path = folder / "hybridlm.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# -- saving ----------------------------------------------------------------------------------------
def test_a_file_is_not_a_save_target(model, tmp_path):
    target = tmp_path / "weights.bin"
    target.write_text("keep me")
    with pytest.raises(HybridLMError, match="existing file") as info:
        save_pretrained(model, target)
    assert str(target) in str(info.value)
    assert target.read_text() == "keep me" and siblings(target) == []


def test_a_foreign_folder_is_refused_and_left_alone(model, tmp_path):
    target = tmp_path / "notes"
    (target / "sub").mkdir(parents=True)
    (target / "a.txt").write_text("mine")
    with pytest.raises(HybridLMError, match="not a hybridlm model folder") as info:
        save_pretrained(model, target, overwrite=True)
    assert str(target) in str(info.value) and "a.txt" in str(info.value) and "sub/" in str(info.value)
    assert sorted(os.listdir(target)) == ["a.txt", "sub"] and siblings(target) == []


def test_an_existing_model_folder_needs_overwrite(model, folder):
    before = snapshot(folder)
    other = build_model(load_spec(TINY), seed=1)
    with pytest.raises(HybridLMError, match=r"overwrite=True.*--overwrite") as info:
        save_pretrained(other, folder)
    assert str(folder) in str(info.value)
    assert snapshot(folder) == before
    save_pretrained(other, folder, overwrite=True, train_seq_len=256)
    assert siblings(folder) == []
    loaded = hybridlm.load(folder)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), other.eval()(ids))
    assert loaded.train_seq_len == 256


def test_overwrite_replaces_the_whole_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    model = build_model(get_preset("mamba3-tiny"), seed=0)
    target = tmp_path / "m"
    save_pretrained(model, target, tokenizer=hybridlm.load_tokenizer(tmp_path / "tokenizer.json"))
    assert (target / "tokenizer.json").is_file()
    save_pretrained(model, target, overwrite=True)  # byte tokenizer now: no stale tokenizer.json
    assert not (target / "tokenizer.json").exists()
    assert hybridlm.load(target).tokenizer.name == "byte"


def test_overwrite_keeps_files_it_did_not_write(model, folder):
    (folder / "README.md").write_text("notes")
    with pytest.raises(HybridLMError, match="README.md") as info:
        save_pretrained(model, folder, overwrite=True)
    assert str(folder) in str(info.value)
    assert (folder / "README.md").read_text() == "notes"


def test_an_empty_folder_and_a_new_path_are_fine(model, tmp_path):
    (tmp_path / "empty").mkdir()
    hybridlm.load(save_pretrained(model, tmp_path / "empty"))
    hybridlm.load(save_pretrained(model, tmp_path / "a" / "b" / "c"))
    assert sorted(os.listdir(tmp_path)) == ["a", "empty"]


@pytest.mark.parametrize("stage", ["save_spec", "hf_config"])
def test_an_interrupted_save_leaves_the_old_folder(model, folder, monkeypatch, stage):
    before = snapshot(folder)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained_mod, stage, boom)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(build_model(load_spec(TINY), seed=5), folder, overwrite=True)
    assert snapshot(folder) == before and siblings(folder) == []
    monkeypatch.undo()
    hybridlm.load(folder)


def test_an_interrupted_first_save_leaves_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained_mod, "save_spec", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_pretrained(model, tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_saving_into_the_working_directory(model, folder, monkeypatch):
    other = build_model(load_spec(TINY), seed=2)
    monkeypatch.chdir(folder)
    save_pretrained(other, ".", overwrite=True, train_seq_len=64)
    assert os.getcwd() == str(folder) and os.path.isdir(os.getcwd())
    assert hybridlm.load(".").train_seq_len == 64 and siblings(folder) == []


@pytest.mark.parametrize("trouble", ["mount point", "rename fails"])
def test_a_folder_that_cannot_be_renamed_is_filled_in_place(folder, monkeypatch, trouble):
    other = build_model(load_spec(TINY), seed=4).eval()
    if trouble == "mount point":
        monkeypatch.setattr(pretrained_mod.os.path, "ismount", lambda p: str(p) == str(folder))
    else:
        rename = os.rename

        def flaky(src, dst):
            if ".tmp-" in str(src):
                raise OSError("busy")
            return rename(src, dst)

        monkeypatch.setattr(pretrained_mod.os, "rename", flaky)
    save_pretrained(other, folder, overwrite=True, train_seq_len=32)
    monkeypatch.undo()
    assert siblings(folder) == []
    loaded = hybridlm.load(folder)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), other(ids))
    assert loaded.train_seq_len == 32


def test_an_incomplete_folder_needs_overwrite(model, folder):
    (folder / "hybridlm.json").unlink()  # what an interrupted in-place save could leave
    with pytest.raises(HybridLMError, match="incomplete"):
        save_pretrained(model, folder)
    save_pretrained(model, folder, overwrite=True)
    hybridlm.load(folder)


def test_save_arguments_are_checked(model, tmp_path):
    with pytest.raises(HybridLMError, match="train_seq_len"):
        save_pretrained(model, tmp_path / "a", train_seq_len=0)
    with pytest.raises(HybridLMError, match="JSON"):
        save_pretrained(model, tmp_path / "b", metadata={"x": object()})
    assert os.listdir(tmp_path) == []


def test_export_takes_overwrite_and_refuses_before_reading_the_checkpoint(folder, tmp_path):
    from hybridlm.titan.export import export_checkpoint

    params = inspect.signature(export_checkpoint).parameters
    assert params["overwrite"].default is False and params["overwrite"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(HybridLMError, match="overwrite=True"):  # not "checkpoint ... does not exist"
        export_checkpoint(tmp_path / "no-such-checkpoint", folder)
    with pytest.raises(HybridLMError, match="does not exist"):
        export_checkpoint(tmp_path / "no-such-checkpoint", folder, overwrite=True)


# -- loading damaged folders -------------------------------------------------------------------------
def test_weights_file_missing_empty_truncated_or_a_folder(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    fails(folder, "no model.safetensors", "model.safetensors")
    weights.write_bytes(b"")
    fails(folder, "empty", "model.safetensors")
    for cut in (5, 100, len(data) // 2, len(data) - 1):
        weights.write_bytes(data[:cut])
        fails(folder, "damaged or incomplete", "model.safetensors")
    weights.unlink()
    weights.mkdir()
    fails(folder, "is a folder", "model.safetensors")


def test_meta_file_damaged(folder):
    meta = folder / "hybridlm.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    fails(folder, "not valid JSON", "hybridlm.json")
    meta.write_text("[1, 2]")
    fails(folder, "a list", "hybridlm.json")
    meta.write_bytes(b"\xff\xfe\x00garbage")
    fails(folder, "hybridlm.json", "hybridlm.json")
    meta.write_text("[" * 100_000 + "]" * 100_000)
    fails(folder, "too deeply", "hybridlm.json")
    meta.write_text(good)
    edit_meta(folder, version="1")
    fails(folder, "version '1' must be an integer", "hybridlm.json")
    edit_meta(folder, version=99)
    fails(folder, "upgrade hybridlm", "hybridlm.json")
    edit_meta(folder, version=1, format="something-else")
    fails(folder, "format", "hybridlm.json")


@pytest.mark.parametrize("record", [42, "gpt2", [1], {"kind": "tokenizers", "file": 42}, {"kind": "tokenizers"},
                                    {"kind": "sentencepiece"}, {"kind": "tokenizers", "file": "../../x.json"}])
def test_tokenizer_record_damaged(folder, record):
    edit_meta(folder, tokenizer=record)
    fails(folder, "tokeni", "hybridlm.json" if not isinstance(record, dict) or record.get("kind") != "tokenizers"
          else "tokenizer")


@pytest.mark.parametrize("value", ["abc", 0, -5, True, 1.5, [128]])
def test_train_seq_len_must_be_a_positive_integer(folder, value):
    edit_meta(folder, train_seq_len=value)
    fails(folder, "train_seq_len .* must be a positive integer", "hybridlm.json")


def test_null_train_seq_len_and_metadata_are_fine(folder):
    edit_meta(folder, train_seq_len=None, metadata=None)
    loaded = load_pretrained(folder)
    assert loaded.train_seq_len is None and loaded.metadata == {}
    edit_meta(folder, metadata=[1])
    fails(folder, "metadata", "hybridlm.json")


def test_spec_file_missing_or_invalid(folder):
    spec = folder / "spec.yaml"
    text = spec.read_text()
    spec.unlink()
    fails(folder, "no spec.yaml", "spec.yaml")
    spec.write_text(text.replace("d_model: 128", "d_model: -1"))
    fails(folder, "d_model", "spec.yaml")
    spec.write_text("pattern: [")
    fails(folder, "YAML", "spec.yaml")


def test_integer_weights_are_refused_by_name(folder):
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in sorted(state) if k.endswith("in_proj.weight"))
    state[name] = state[name].to(torch.int8)
    save_file(state, str(weights), metadata={"format": "hybridlm-model"})
    message = fails(folder, "wrong type", "model.safetensors")
    assert name in message and "I8" in message


def test_non_finite_weights_warn_once_naming_the_tensors(folder):
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    names = sorted(k for k in state if k.endswith("norm.weight"))[:2]
    state[names[0]][0] = float("nan")
    state[names[1]][-1] = float("inf")
    save_file(state, str(weights), metadata={"format": "hybridlm-model"})
    for _ in range(2):  # every load warns, once
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            load_pretrained(folder)
        ours = [w for w in caught if issubclass(w.category, NonFiniteWeightsWarning)]
        assert len(ours) == 1
        text = str(ours[0].message)
        assert all(n in text for n in names) and str(folder) in text and "2 tensor(s)" in text


def test_bfloat16_weights_on_disk_load(model, tmp_path):
    save_pretrained(model.to(torch.bfloat16), tmp_path / "bf16")
    loaded = load_pretrained(tmp_path / "bf16")
    assert loaded.model.tok_embeddings.weight.dtype == torch.float32


# -- spec.yaml edited after saving ---------------------------------------------------------------------
def _edit_spec(folder, edit):
    path = folder / "spec.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("field, value, needle", [
    ("A", ("position", "rope"), "blocks.A.position: saved 'nope', now 'rope'"),
    ("M", ("out_norm", "postgate_grouped"), "blocks.M.out_norm: saved 'pregate_grouped', now 'postgate_grouped'"),
    ("A", ("qk_norm", False), None),  # unchanged value: loads
])
def test_spec_edited_after_saving_is_refused(folder, field, value, needle):
    _edit_spec(folder, lambda d: d["blocks"][field].__setitem__(*value))
    if needle is None:
        load_pretrained(folder)
        return
    message = fails(folder, "changed after the weights were saved", "spec.yaml")
    assert needle in message


def test_shape_changing_spec_edits_say_both(folder):
    _edit_spec(folder, lambda d: d["blocks"]["F"].__setitem__("hidden", 256))
    message = fails(folder, "does not match spec.yaml", "model.safetensors")
    assert "changed after the weights were saved" in message and "blocks.F.hidden: saved 352, now 256" in message


def test_harmless_spec_edits_load(folder):
    def edit(d):
        d["name"] = "renamed"
        d["pattern"] = "M F M F M F A F M F M F M F A F"  # the same expansion written out
        d["blocks"]["M"]["backend"] = "reference"
        d["blocks"]["M"]["chunk_size"] = 16
    _edit_spec(folder, edit)
    loaded = load_pretrained(folder)
    assert loaded.spec.name == "renamed"


def test_folders_without_a_recorded_spec_still_load(folder):
    path = folder / "hybridlm.json"
    meta = json.loads(path.read_text())
    assert "spec" in meta
    del meta["spec"]
    path.write_text(json.dumps(meta))
    _edit_spec(folder, lambda d: d["blocks"]["A"].__setitem__("position", "rope"))
    load_pretrained(folder)  # nothing to compare against: loads as before
    edit_meta(folder, spec=[1])
    fails(folder, "recorded", "hybridlm.json")


# -- load arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                             ("float32", torch.float32), ("bf16", torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16), (None, torch.float32)])
def test_dtype_by_name_or_torch_dtype(folder, dtype, expected):
    loaded = hybridlm.load(folder, dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    evaluated = load_eval_model(str(folder), dtype=dtype)
    assert {p.dtype for p in evaluated.model.parameters()} == {expected}


@pytest.mark.parametrize("dtype", ["float8", "int8", torch.int8, 3])
def test_unknown_dtype_is_one_clear_error(folder, dtype):
    with pytest.raises(HybridLMError, match="float32.*bfloat16.*float16"):
        hybridlm.load(folder, dtype=dtype)


@pytest.mark.parametrize("device", ["nonsense", "cuda:banana", "banana:0"])
def test_unknown_device_is_one_clear_error(folder, device):
    with pytest.raises(HybridLMError, match=f"unknown device '{device}'"):
        hybridlm.load(folder, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(folder):
    with pytest.raises(HybridLMError, match="CUDA is not available"):
        hybridlm.load(folder, device="cuda")


def test_not_a_folder(folder, tmp_path):
    fails(tmp_path / "nowhere", "does not exist")
    fails(folder / "model.safetensors", "is a file")
    with pytest.raises(HybridLMError, match="pass the folder itself"):
        load_eval_model(str(folder / "model.safetensors"))


@pytest.mark.parametrize("damage", ["weights", "meta", "seq_len", "spec"])
def test_eval_loader_reports_the_same_errors(folder, damage):
    if damage == "weights":
        (folder / "model.safetensors").write_bytes(b"")
    elif damage == "meta":
        (folder / "hybridlm.json").write_text("{")
    elif damage == "seq_len":
        edit_meta(folder, train_seq_len="abc")
    else:
        _edit_spec(folder, lambda d: d["blocks"]["A"].__setitem__("position", "rope"))
    fails(folder, ".", loader=load_eval_model)


def test_eval_tokenizer_override_must_fit(folder, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(300)}
    vocab["[UNK]"] = 300
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.save(str(tmp_path / "big.json"))
    with pytest.raises(HybridLMError, match="vocab_size"):
        load_eval_model(str(folder), tokenizer=str(tmp_path / "big.json"))
