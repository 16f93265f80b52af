"""Model folders: save -> load gives the same logits, tokenizer and training length; bad folders fail clearly."""
import json

import pytest
import torch

import hybridlm
from hybridlm.builder import build_model
from hybridlm.builder.io.pretrained import load_pretrained, save_pretrained
from hybridlm.errors import HybridLMError
from hybridlm.layouts import load_spec
from hybridlm.layouts.presets import get_preset


@pytest.mark.parametrize("spec", ["specs/tiny-hybrid.yaml", "mamba3-mimo-tiny", "transformer-tiny"])
def test_round_trip_gives_identical_logits(spec, tmp_path):
    s = load_spec(spec) if spec.endswith(".yaml") else get_preset(spec)
    model = build_model(s, seed=3).eval()
    save_pretrained(model, tmp_path / "m", train_seq_len=512, metadata={"steps": 10})
    loaded = hybridlm.load(tmp_path / "m")
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded.model(ids))
    assert loaded.train_seq_len == 512 and loaded.metadata == {"steps": 10}
    assert loaded.spec == s and not loaded.model.training
    assert (loaded.model.output.weight is loaded.model.tok_embeddings.weight) == s.tie_embeddings
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["layer_types"] == s.layer_types()


def test_tokenizer_file_travels_with_the_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    file_tok = hybridlm.load_tokenizer(tmp_path / "tokenizer.json")
    model = build_model(get_preset("mamba3-tiny"), seed=0)
    save_pretrained(model, tmp_path / "m", tokenizer=file_tok)
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.tokenizer.encode("hello world oops") == [1, 2, 0]
    assert loaded.train_seq_len is None


def test_bad_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(HybridLMError, match="not a hybridlm model folder"):
        load_pretrained(tmp_path)
    model = build_model(get_preset("mamba3-tiny"), seed=0)
    save_pretrained(model, tmp_path / "m")
    other = get_preset("transformer-tiny")
    (tmp_path / "m" / "spec.yaml").write_text(hybridlm.dump_spec(other))
    with pytest.raises(HybridLMError, match="does not match spec.yaml"):
        load_pretrained(tmp_path / "m")
    meta = tmp_path / "m" / "hybridlm.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 99}))
    with pytest.raises(HybridLMError, match="upgrade hybridlm"):
        load_pretrained(tmp_path / "m")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    spec = get_preset("mamba3-tiny").model_copy(update={"vocab_size": 128})
    with pytest.raises(HybridLMError, match="vocab_size >= 256"):
        save_pretrained(build_model(spec, seed=0), tmp_path)
    with pytest.raises(HybridLMError, match="neither 'byte' nor"):
        hybridlm.load_tokenizer(tmp_path / "nothing.json")
