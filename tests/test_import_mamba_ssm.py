"""`import-mamba-ssm`: a mamba_ssm MambaLMHeadModel folder becomes a hybridlm model folder with the same logits.

The test writes the official folders itself: it builds a hybridlm model from a hand-written spec,
re-keys its weights to the official names (its own writer, not the converter's mapping), and checks
that an independently written forward of the official LM wiring (Block / GatedMLP / MHA as in
mamba_ssm.models.mixer_seq_simple, docs/mamba3.md §7) gives that model's logits. The imported
folder must then reproduce those logits exactly.
"""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

import hybridlm
from hybridlm.blocks import Mamba3
from hybridlm.builder import build_model
from hybridlm.builder.io.mamba_ssm import MambaConfigUnsupported, import_mamba_ssm, spec_from_mamba_config
from hybridlm.cli.import_mamba_ssm import add_parser
from hybridlm.errors import HybridLMError
from hybridlm.layouts import AttentionSpec, Mamba3Spec, ModelSpec, SwiGLUSpec

SISO = {"layer": "Mamba3", "d_state": 16, "headdim": 16, "chunk_size": 16}

# name -> (MambaConfig fields, the spec a reader of docs/mamba3.md §7 would write for it, weights file)
CASES = {
    "siso-tied-padded-vocab": (
        {"d_model": 64, "n_layer": 2, "vocab_size": 300, "pad_vocab_size_multiple": 16, "ssm_cfg": SISO},
        ModelSpec(vocab_size=304, d_model=64, residual_in_fp32=True, pattern="M M",
                  blocks={"M": Mamba3Spec(d_state=16, headdim=16, chunk_size=16)}),
        "pytorch_model.bin"),
    "siso-mlp-untied": (
        {"d_model": 64, "n_layer": 2, "d_intermediate": 100, "vocab_size": 256, "tie_embeddings": False,
         "residual_in_fp32": False,
         "ssm_cfg": {**SISO, "ngroups": 2, "rope_fraction": 1.0, "is_outproj_norm": True}},
        ModelSpec(vocab_size=256, d_model=64, tie_embeddings=False, pattern="M F M F",
                  blocks={"M": Mamba3Spec(d_state=16, headdim=16, chunk_size=16, ngroups=2, rope_fraction=1.0,
                                          out_norm="pregate_grouped"),
                          "F": SwiGLUSpec(hidden=128)}),  # GatedMLP rounds 100 up to a multiple of 128
        "model.safetensors"),
    "hybrid-rope-gqa-zero-biases": (
        {"d_model": 64, "n_layer": 4, "d_intermediate": 128, "vocab_size": 256, "ssm_cfg": SISO,
         "attn_layer_idx": [1, 3],
         "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "causal": True, "rotary_emb_dim": 16,
                      "rotary_emb_base": 500.0}},
        ModelSpec(vocab_size=256, d_model=64, residual_in_fp32=True, pattern="M F A F M F A F",
                  blocks={"M": Mamba3Spec(d_state=16, headdim=16, chunk_size=16),
                          "A": AttentionSpec(n_heads=4, n_kv_heads=2, position="rope", rope_theta=500.0),
                          "F": SwiGLUSpec(hidden=128)}),
        "pytorch_model.bin"),
    "hybrid-nope-attention-first": (
        {"d_model": 64, "n_layer": 3, "vocab_size": 256, "ssm_cfg": SISO, "attn_layer_idx": [0],
         "attn_cfg": {"num_heads": 4, "head_dim": 32, "causal": True, "qkv_proj_bias": False,
                      "out_proj_bias": False, "softmax_scale": 1 / math.sqrt(32)}},
        ModelSpec(vocab_size=256, d_model=64, residual_in_fp32=True, pattern="A M M",
                  blocks={"M": Mamba3Spec(d_state=16, headdim=16, chunk_size=16),
                          "A": AttentionSpec(n_heads=4, head_dim=32, position="nope")}),
        "model.safetensors"),
    "mimo-mlp": (
        {"d_model": 64, "n_layer": 2, "d_intermediate": 64, "vocab_size": 260, "tie_embeddings": False,
         "ssm_cfg": {"layer": "Mamba3", "d_state": 16, "headdim": 16, "is_mimo": True, "mimo_rank": 2,
                     "is_outproj_norm": True, "chunk_size": 8, "fuse_pregate_headwise_norm": True}},
        ModelSpec(vocab_size=264, d_model=64, tie_embeddings=False, residual_in_fp32=True, pattern="M F M F",
                  blocks={"M": Mamba3Spec(d_state=16, headdim=16, mimo_rank=2, out_norm="pregate_grouped",
                                          chunk_size=8),
                          "F": SwiGLUSpec(hidden=128)}),
        "model.safetensors"),
}


# -- the official layout, written independently of the converter ----------------------------------
def full_config(config: dict) -> dict:
    defaults = {"d_intermediate": 0, "ssm_cfg": {}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
                "tie_embeddings": True}
    return {**defaults, **config}


def perturbed_model(spec: ModelSpec) -> hybridlm.HybridLM:
    """Random weights everywhere, so that swapped norms, biases or halves change the logits."""
    model = build_model(spec, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def official_state_dict(model: hybridlm.HybridLM, config: dict) -> dict[str, torch.Tensor]:
    """Our model's weights under MambaLMHeadModel's names (one Block = mixer block [+ MLP block])."""
    cfg = full_config(config)
    sd = {"backbone.embedding.weight": model.tok_embeddings.weight}
    blocks_per_layer = 2 if cfg["d_intermediate"] else 1
    for n in range(cfg["n_layer"]):
        ours, theirs = model.layers[n * blocks_per_layer], f"backbone.layers.{n}"
        sd[f"{theirs}.norm.weight"] = ours.norm.weight
        mixer = ours.mixer
        if n in cfg["attn_layer_idx"]:
            sd[f"{theirs}.mixer.in_proj.weight"] = torch.cat([mixer.wq.weight, mixer.wk.weight, mixer.wv.weight])
            sd[f"{theirs}.mixer.out_proj.weight"] = mixer.wo.weight
            if cfg["attn_cfg"].get("qkv_proj_bias", True):  # the official init zeroes biases
                sd[f"{theirs}.mixer.in_proj.bias"] = torch.zeros(mixer.wq.out_features + 2 * mixer.wk.out_features)
            if cfg["attn_cfg"].get("out_proj_bias", True):
                sd[f"{theirs}.mixer.out_proj.bias"] = torch.zeros(mixer.wo.out_features)
        else:
            sd.update({f"{theirs}.mixer.{k}": v for k, v in mixer.state_dict().items()})
        if cfg["d_intermediate"]:
            mlp_block = model.layers[n * blocks_per_layer + 1]
            sd[f"{theirs}.norm2.weight"] = mlp_block.norm.weight
            sd[f"{theirs}.mlp.fc1.weight"] = torch.cat([mlp_block.mixer.w3.weight, mlp_block.mixer.w1.weight])
            sd[f"{theirs}.mlp.fc2.weight"] = mlp_block.mixer.w2.weight
    sd["backbone.norm_f.weight"] = model.norm.weight
    sd["lm_head.weight"] = model.output.weight  # MambaLMHeadModel.state_dict() has it even when tied
    return {k: v.detach().clone() for k, v in sd.items()}


def write_official_folder(folder, config: dict, sd: dict, weights_file: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights_file == "model.safetensors":
        from safetensors.torch import save_file

        if full_config(config)["tie_embeddings"]:  # safetensors stores shared tensors once
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        save_file(sd, str(folder / weights_file))
    else:
        torch.save(sd, folder / weights_file)
    return folder


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_mha(x, sd, prefix, acfg, d_model):
    H = acfg["num_heads"]
    Hkv = acfg.get("num_heads_kv") or H
    hd = acfg.get("head_dim") or d_model // H
    qkv = F.linear(x, sd[prefix + "in_proj.weight"], sd.get(prefix + "in_proj.bias"))
    q, kv = qkv.split([H * hd, 2 * Hkv * hd], dim=-1)
    q = q.unflatten(-1, (H, hd))
    k, v = kv.unflatten(-1, (2, Hkv, hd)).unbind(-3)
    rd = acfg.get("rotary_emb_dim", 0)
    if rd:  # flash-attn RotaryEmbedding, non-interleaved: rotate_half over (first half, second half)
        inv_freq = 1.0 / acfg.get("rotary_emb_base", 10000.0) ** (torch.arange(0, rd, 2).float() / rd)
        freqs = torch.outer(torch.arange(x.shape[1]).float(), inv_freq)
        cos, sin = torch.cat([freqs.cos()] * 2, -1)[:, None], torch.cat([freqs.sin()] * 2, -1)[:, None]

        def rotate(t):
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        q, k = rotate(q), rotate(k)
    k = torch.repeat_interleave(k, H // Hkv, dim=2)
    v = torch.repeat_interleave(v, H // Hkv, dim=2)
    ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=acfg.get("causal", False), scale=acfg.get("softmax_scale"))
    return F.linear(ctx.transpose(1, 2).flatten(-2), sd[prefix + "out_proj.weight"], sd.get(prefix + "out_proj.bias"))


def reference_gated_mlp(x, fc1, fc2):
    y, gate = F.linear(x, fc1).chunk(2, dim=-1)
    return F.linear(y * F.silu(gate), fc2)


@torch.no_grad()
def reference_logits(config: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """MambaLMHeadModel's forward: Add -> Norm -> Mixer [-> Add -> Norm2 -> MLP] per Block, then norm_f."""
    cfg = full_config(config)
    hidden, residual = F.embedding(ids, sd["backbone.embedding.weight"]), None
    for n in range(cfg["n_layer"]):
        prefix = f"backbone.layers.{n}."
        residual = hidden if residual is None else hidden + residual
        hidden = rms(residual, sd[prefix + "norm.weight"])
        if n in cfg["attn_layer_idx"]:
            hidden = reference_mha(hidden, sd, prefix + "mixer.", cfg["attn_cfg"], cfg["d_model"])
        else:  # hybridlm's Mamba3 stands in for the official module: it takes its keywords and state_dict
            kwargs = {k: v for k, v in cfg["ssm_cfg"].items() if k != "layer"}
            mixer = Mamba3(cfg["d_model"], layer_idx=n, **kwargs)
            mixer.load_state_dict({k[len(prefix + "mixer."):]: v for k, v in sd.items()
                                   if k.startswith(prefix + "mixer.")}, strict=True)
            hidden = mixer(hidden)
        if cfg["d_intermediate"]:
            residual = hidden + residual
            hidden = reference_gated_mlp(rms(residual, sd[prefix + "norm2.weight"]), sd[prefix + "mlp.fc1.weight"],
                                         sd[prefix + "mlp.fc2.weight"])
    hidden = rms(hidden + residual, sd["backbone.norm_f.weight"])
    head = sd["backbone.embedding.weight"] if cfg["tie_embeddings"] else sd["lm_head.weight"]
    return hidden @ head.T


def official_folder(tmp_path, case: str):
    config, spec, weights_file = CASES[case]
    model = perturbed_model(spec)
    sd = official_state_dict(model, config)
    return write_official_folder(tmp_path / "official", config, sd, weights_file), model, sd


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_imported_folder_gives_the_official_wirings_logits(case, tmp_path):
    config, spec, _ = CASES[case]
    src, model, sd = official_folder(tmp_path, case)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = model(ids)
    # The writer and the hand-written spec agree with the official wiring, independently of the converter.
    torch.testing.assert_close(reference_logits(config, sd, ids), expected, atol=2e-4, rtol=1e-4)

    out = import_mamba_ssm(src, tmp_path / "imported", train_seq_len=128)
    loaded = hybridlm.load(out)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), expected)
    assert [r.spec for r in loaded.spec.resolve()] == [r.spec for r in spec.resolve()]
    assert (loaded.spec.vocab_size, loaded.spec.tie_embeddings, loaded.spec.residual_in_fp32) == \
        (spec.vocab_size, spec.tie_embeddings, spec.residual_in_fp32)
    assert loaded.train_seq_len == 128
    assert loaded.metadata["imported_from"] == "mamba_ssm"
    assert (loaded.model.output.weight is loaded.model.tok_embeddings.weight) == spec.tie_embeddings


def test_cli_subcommand_writes_a_loadable_folder(tmp_path, capsys):
    src, model, _ = official_folder(tmp_path, "hybrid-rope-gqa-zero-biases")
    parser = argparse.ArgumentParser(prog="hybridlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["import-mamba-ssm", str(src), "--out", str(tmp_path / "m"), "--train-len", "64"])
    assert args.func(args) == 0
    assert "pattern (M F A F) *2, vocab 256, tokenizer byte" in capsys.readouterr().out
    loaded = hybridlm.load(tmp_path / "m")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    assert loaded.train_seq_len == 64


BASE = {"d_model": 64, "n_layer": 2, "vocab_size": 256, "ssm_cfg": SISO, "attn_layer_idx": [1],
        "attn_cfg": {"num_heads": 4, "causal": True, "rotary_emb_dim": 16}}


@pytest.mark.parametrize("change, field", [
    ({"ssm_cfg": {**SISO, "layer": "Mamba2"}}, "ssm_cfg.layer"),
    ({"ssm_cfg": {"d_state": 16}}, "ssm_cfg.layer"),  # the official default is Mamba1
    ({"ssm_cfg": {**SISO, "d_conv": 4}}, "ssm_cfg.d_conv"),
    ({"ssm_cfg": {**SISO, "is_mimo": True, "mimo_rank": 1}}, "ssm_cfg.mimo_rank"),
    ({"ssm_cfg": {**SISO, "expand": 1.5}}, "ssm_cfg.expand"),
    ({"ssm_cfg": {**SISO, "headdim": 48}}, "ssm_cfg.headdim"),
    ({"ssm_cfg": {**SISO, "rope_fraction": 0.25}}, "ssm_cfg.rope_fraction"),
    ({"attn_cfg": {**BASE["attn_cfg"], "d_conv": 4}}, "attn_cfg.d_conv"),
    ({"attn_cfg": {**BASE["attn_cfg"], "mlp_dim": 64}}, "attn_cfg.mlp_dim"),
    ({"attn_cfg": {**BASE["attn_cfg"], "rotary_emb_dim": 8}}, "attn_cfg.rotary_emb_dim"),
    ({"attn_cfg": {**BASE["attn_cfg"], "rotary_emb_interleaved": True}}, "attn_cfg.rotary_emb_interleaved"),
    ({"attn_cfg": {**BASE["attn_cfg"], "causal": False}}, "attn_cfg.causal"),
    ({"attn_cfg": {"num_heads": 4, "rotary_emb_dim": 16}}, "attn_cfg.causal"),  # MHA defaults to bidirectional
    ({"attn_cfg": {**BASE["attn_cfg"], "softmax_scale": 0.5}}, "attn_cfg.softmax_scale"),
    ({"attn_cfg": {**BASE["attn_cfg"], "num_heads_kv": 3}}, "attn_cfg.num_heads_kv"),
    ({"attn_cfg": {"causal": True}}, "attn_cfg.num_heads"),
    ({"rms_norm": False}, "rms_norm"),
    ({"attn_layer_idx": [2]}, "attn_layer_idx"),
    ({"norm_epsilon": 1e-6}, "norm_epsilon"),
])
def test_configs_hybridlm_cannot_represent_name_the_field(change, field):
    with pytest.raises(MambaConfigUnsupported) as info:
        spec_from_mamba_config({**BASE, **change})
    assert info.value.field == field
    assert str(info.value).startswith(f"mamba_ssm config.json: {field} = ")


def test_the_base_config_of_the_error_cases_is_valid():
    spec = spec_from_mamba_config(BASE)
    assert spec.layer_types() == ["linear_attention", "full_attention"]


def _rewrite_weights(src, edit):
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    edit(sd)
    torch.save(sd, src / "pytorch_model.bin")


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd["backbone.layers.1.mixer.in_proj.bias"].fill_(0.5),
     r"attn_cfg.qkv_proj_bias = True: backbone.layers.1.mixer.in_proj.bias is not zero"),
    (lambda sd: sd["backbone.layers.3.mixer.out_proj.bias"].fill_(0.5), r"attn_cfg.out_proj_bias = True"),
    (lambda sd: sd["lm_head.weight"].add_(1.0), r"tie_embeddings = True: lm_head.weight differs"),
    (lambda sd: sd.pop("backbone.layers.0.norm2.weight"), r"no 'backbone.layers.0.norm2.weight'"),
    (lambda sd: sd.update({"backbone.layers.0.norm.bias": torch.zeros(64)}),
     r"keys the config does not explain: backbone.layers.0.norm.bias"),
    (lambda sd: sd.update({"backbone.embedding.weight": torch.zeros(264, 64)}),
     r"vocab_size = 256: padded to a multiple of pad_vocab_size_multiple = 8 it gives 256 rows, but "
     r"backbone.embedding.weight has 264"),
    (lambda sd: sd.update({"backbone.layers.0.mixer.D": torch.ones(3)}),
     r"layers.0.mixer.D is \[3\], the config needs \[8\]"),
    (lambda sd: sd.update({"backbone.layers.0.mixer.conv1d.weight": torch.ones(3)}),
     r"unexpected layers.0.mixer.conv1d.weight"),
])
def test_weights_hybridlm_cannot_represent_fail_clearly(edit, message, tmp_path):
    src, _, _ = official_folder(tmp_path, "hybrid-rope-gqa-zero-biases")
    _rewrite_weights(src, edit)
    with pytest.raises(HybridLMError, match=message):
        import_mamba_ssm(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_source_folders_tokenizer_travels(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    src, _, _ = official_folder(tmp_path, "siso-tied-padded-vocab")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    loaded = hybridlm.load(import_mamba_ssm(src, tmp_path / "m"))
    assert loaded.tokenizer.encode("hello world oops") == [1, 2, 0]


def test_untied_folder_without_lm_head_fails_clearly(tmp_path):
    src, _, _ = official_folder(tmp_path, "siso-mlp-untied")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(MambaConfigUnsupported, match="tie_embeddings = False: the weights have no lm_head.weight"):
        import_mamba_ssm(src, tmp_path / "out")


def test_folders_without_config_or_weights_fail_clearly(tmp_path):
    with pytest.raises(HybridLMError, match="no config.json"):
        import_mamba_ssm(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "attn_cfg": {"num_heads": 4}}))
    with pytest.raises(MambaConfigUnsupported, match="attn_cfg.causal"):  # the config is refused first
        import_mamba_ssm(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(HybridLMError, match="no weights: expected one of model.safetensors, pytorch_model.bin"):
        import_mamba_ssm(tmp_path, tmp_path / "out")
