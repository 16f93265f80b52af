"""Import a mamba_ssm ``MambaLMHeadModel`` folder (``config.json`` + state_dict) as a hybridlm model.

The official LM (docs/mamba3.md §7) is a stack of ``Block``s, each ``r += h; h = mixer(norm(r))``
and, when ``d_intermediate > 0``, ``r += h; h = mlp(norm2(r))``; then ``norm_f`` and ``lm_head``.
Moving the adds to the end of each sublayer gives hybridlm's pre-norm residual blocks, so official
layer N becomes one mixer block (``M`` for Mamba-3, ``A`` for an ``attn_layer_idx`` layer) followed
by one SwiGLU block ``F`` when there is an MLP. Key mapping (official -> hybridlm)::

    backbone.embedding.weight          tok_embeddings.weight
    backbone.layers.N.norm.weight      layers.<mixer block of N>.norm.weight
    backbone.layers.N.mixer.*          layers.<mixer block of N>.mixer.*   (Mamba-3: same names)
        MHA in_proj.weight             split into wq | wk | wv   (kv laid out (two, hkv, head_dim))
        MHA out_proj.weight            wo
    backbone.layers.N.norm2.weight     layers.<mixer block of N + 1>.norm.weight
    backbone.layers.N.mlp.fc1.weight   split into w3 (first half: value) | w1 (second half: gate)
    backbone.layers.N.mlp.fc2.weight   w2
    backbone.norm_f.weight             norm.weight
    lm_head.weight                     output.weight   (absent or equal to the embedding when tied)

What hybridlm's blocks cannot represent raises :class:`MambaConfigUnsupported` naming the config
field (``attn_cfg.d_conv``, ``ssm_cfg.layer``, ...), before any weight is read.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.errors import HybridLMError, SpecError
from hybridlm.layouts.blocks import AttentionSpec, Mamba3Spec, SwiGLUSpec
from hybridlm.layouts.pattern import compress_symbols
from hybridlm.layouts.spec import ModelSpec

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# mamba_ssm.models.config_mamba.MambaConfig, field -> default.
MAMBA_CONFIG_DEFAULTS: dict[str, Any] = {
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {}, "attn_layer_idx": [],
    "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 8, "tie_embeddings": True,
}
# The official LM builds every norm with its default eps; MambaConfig has no field for it.
OFFICIAL_NORM_EPS = 1e-5
# GatedMLP rounds its hidden width up to this multiple.
GATED_MLP_MULTIPLE = 128

# ssm_cfg keys of the official Mamba3 constructor that map one to one onto Mamba3Spec fields.
MAMBA3_SAME_NAME_KEYS = ("d_state", "expand", "headdim", "ngroups", "rope_fraction", "dt_min", "dt_max",
                         "dt_init_floor", "A_floor", "chunk_size")
# ssm_cfg keys the official Mamba3 accepts but that do not change the math (fusion switch, ignored args).
MAMBA3_NO_MATH_KEYS = ("fuse_pregate_headwise_norm", "dropout", "n_layer")
MAMBA3_KEYS = ("layer", "is_outproj_norm", "is_mimo", "mimo_rank") + MAMBA3_SAME_NAME_KEYS + MAMBA3_NO_MATH_KEYS
# The official Mamba3 defaults (docs/mamba3.md §1.1) plus the switches of the math it implements, written
# out so that a change of Mamba3Spec's defaults cannot change what an import means.
OFFICIAL_MAMBA3 = {"d_state": 128, "expand": 2, "headdim": 64, "ngroups": 1, "rope_fraction": 0.5,
                   "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "A_floor": 1e-4, "chunk_size": 64,
                   "a_activation": "heavy_tail", "discretization": "trapezoid", "rotation": True, "bc_bias": True,
                   "conv_kernel": 0}
OFFICIAL_MIMO_RANK = 4  # the official default when is_mimo is set and mimo_rank is not

MHA_KEYS = ("num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias", "softmax_scale",
            "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved")

# Mamba3Spec field -> ssm_cfg key, for the fields read from ssm_cfg.
MAMBA3_FIELD_TO_SSM_CFG = {**{k: k for k in MAMBA3_SAME_NAME_KEYS}, "mimo_rank": "mimo_rank"}
# AttentionSpec field -> MHA argument.
ATTENTION_FIELD_TO_MHA = {"n_heads": "num_heads", "n_kv_heads": "num_heads_kv", "head_dim": "head_dim",
                          "rope_theta": "rotary_emb_base"}

MAMBA_SYMBOL, ATTENTION_SYMBOL, MLP_SYMBOL = "M", "A", "F"
# Our spec's fields back to the config fields they came from, so a spec-level error names the config.
SPEC_PATH_TO_CONFIG = {
    **{f"blocks.{MAMBA_SYMBOL}.{f}": f"ssm_cfg.{k}" for f, k in MAMBA3_FIELD_TO_SSM_CFG.items()},
    **{f"blocks.{ATTENTION_SYMBOL}.{f}": f"attn_cfg.{k}" for f, k in ATTENTION_FIELD_TO_MHA.items()},
    f"blocks.{MLP_SYMBOL}.hidden": "d_intermediate",
    "vocab_size": "vocab_size", "d_model": "d_model",
}


class MambaConfigUnsupported(HybridLMError):
    """A mamba_ssm config (or its weights) that hybridlm's blocks cannot represent exactly.

    ``field`` is the config field to look at (``attn_cfg.d_conv``), ``value`` its value.
    """

    def __init__(self, field: str, value: Any, reason: str):
        self.field = field
        self.value = value
        super().__init__(f"mamba_ssm {CONFIG_FILE}: {field} = {value!r}: {reason}")


# -- config -> spec ------------------------------------------------------------------------------
def spec_from_mamba_config(config: dict, *, name: str = "mamba-ssm-import") -> ModelSpec:
    """The hybridlm spec of a ``MambaConfig`` (as a dict, missing fields at MambaConfig's defaults)."""
    if not isinstance(config, dict):
        raise MambaConfigUnsupported("<config>", config, "expected a JSON object with MambaConfig's fields")
    unknown = sorted(set(config) - set(MAMBA_CONFIG_DEFAULTS))
    if unknown:  # MambaConfig(**config) itself refuses them
        raise MambaConfigUnsupported(unknown[0], config[unknown[0]],
                                     f"not a MambaConfig field (fields: {', '.join(MAMBA_CONFIG_DEFAULTS)})")
    cfg = {**MAMBA_CONFIG_DEFAULTS, **config}
    n_layer = _positive_int(cfg, "n_layer")
    d_model = _positive_int(cfg, "d_model")
    if not cfg["rms_norm"]:
        raise MambaConfigUnsupported("rms_norm", cfg["rms_norm"],
                                     "hybridlm's norms are RMSNorm; LayerNorm (mean-centred, with a bias) has no "
                                     "equivalent")
    attn_layers = _attention_layers(cfg["attn_layer_idx"], n_layer)
    d_intermediate = cfg["d_intermediate"]
    if not _is_int(d_intermediate) or d_intermediate < 0:
        raise MambaConfigUnsupported("d_intermediate", d_intermediate, "must be a whole number >= 0")

    blocks: dict[str, Any] = {}
    if len(attn_layers) < n_layer:
        blocks[MAMBA_SYMBOL] = _mamba3_block(cfg["ssm_cfg"])
    if attn_layers:
        blocks[ATTENTION_SYMBOL] = _attention_block(cfg["attn_cfg"], d_model)
    if d_intermediate:
        blocks[MLP_SYMBOL] = SwiGLUSpec(hidden=-(-d_intermediate // GATED_MLP_MULTIPLE) * GATED_MLP_MULTIPLE)
    symbols = []
    for layer in range(n_layer):
        symbols.append(ATTENTION_SYMBOL if layer in attn_layers else MAMBA_SYMBOL)
        if d_intermediate:
            symbols.append(MLP_SYMBOL)

    multiple = _positive_int(cfg, "pad_vocab_size_multiple")
    vocab = _positive_int(cfg, "vocab_size")
    try:
        return ModelSpec(name=name, vocab_size=-(-vocab // multiple) * multiple, d_model=d_model,
                         blocks=blocks, pattern=compress_symbols(symbols),
                         tie_embeddings=bool(cfg["tie_embeddings"]), norm_eps=OFFICIAL_NORM_EPS,
                         residual_in_fp32=bool(cfg["residual_in_fp32"]))
    except SpecError as err:
        field = SPEC_PATH_TO_CONFIG.get(err.path, err.path)
        raise MambaConfigUnsupported(field, err.value if err.has_value else None, err.reason) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(cfg: dict, field: str) -> int:
    if not _is_int(cfg[field]) or cfg[field] < 1:
        raise MambaConfigUnsupported(field, cfg[field], "must be a whole number >= 1")
    return cfg[field]


def _attention_layers(attn_layer_idx: Any, n_layer: int) -> set[int]:
    if not isinstance(attn_layer_idx, list):
        raise MambaConfigUnsupported("attn_layer_idx", attn_layer_idx, "must be a list of layer indices")
    for i in attn_layer_idx:
        if not _is_int(i) or not 0 <= i < n_layer:
            raise MambaConfigUnsupported("attn_layer_idx", attn_layer_idx,
                                         f"{i!r} is not a layer index (0..{n_layer - 1})")
    return set(attn_layer_idx)


def _mamba3_block(ssm_cfg: Any) -> Mamba3Spec:
    if not isinstance(ssm_cfg, dict):
        raise MambaConfigUnsupported("ssm_cfg", ssm_cfg, "must be a mapping of Mamba3 constructor arguments")
    # The official create_block defaults the layer to Mamba1.
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer != "Mamba3":
        raise MambaConfigUnsupported("ssm_cfg.layer", layer, "hybridlm imports Mamba-3 layers only "
                                     "(set by ssm_cfg.layer = \"Mamba3\"); Mamba1/Mamba2 mixers have no hybridlm block")
    unknown = sorted(set(ssm_cfg) - set(MAMBA3_KEYS))
    if unknown:
        raise MambaConfigUnsupported(f"ssm_cfg.{unknown[0]}", ssm_cfg[unknown[0]],
                                     f"not a Mamba3 argument hybridlm knows (known: {', '.join(MAMBA3_KEYS)})")
    fields = {**OFFICIAL_MAMBA3, **{k: ssm_cfg[k] for k in MAMBA3_SAME_NAME_KEYS if k in ssm_cfg}}
    expand = fields["expand"]
    if isinstance(expand, float) and expand.is_integer():
        fields["expand"] = int(expand)
    elif not _is_int(expand):
        raise MambaConfigUnsupported("ssm_cfg.expand", expand,
                                     "hybridlm's Mamba-3 takes a whole-number expand (d_inner = expand * d_model)")
    fields["out_norm"] = "pregate_grouped" if ssm_cfg.get("is_outproj_norm", False) else "none"
    if ssm_cfg.get("is_mimo", False):
        rank = ssm_cfg.get("mimo_rank", OFFICIAL_MIMO_RANK)
        if not _is_int(rank) or rank < 2:
            # Official MIMO at R = 1 still uses the MIMO pair layout and mimo_* vectors; our R = 1 is SISO.
            raise MambaConfigUnsupported("ssm_cfg.mimo_rank", rank,
                                         "with is_mimo = true hybridlm needs mimo_rank >= 2 (rank 1 is SISO)")
        fields["mimo_rank"] = rank
    return _block_spec(Mamba3Spec, fields, "ssm_cfg", ssm_cfg, MAMBA3_FIELD_TO_SSM_CFG)


def _attention_block(attn_cfg: Any, d_model: int) -> AttentionSpec:
    if not isinstance(attn_cfg, dict):
        raise MambaConfigUnsupported("attn_cfg", attn_cfg, "must be a mapping of MHA constructor arguments")
    unknown = sorted(set(attn_cfg) - set(MHA_KEYS))
    if unknown:
        raise MambaConfigUnsupported(f"attn_cfg.{unknown[0]}", attn_cfg[unknown[0]],
                                     f"not an MHA argument hybridlm knows (known: {', '.join(MHA_KEYS)})")
    if "num_heads" not in attn_cfg:
        raise MambaConfigUnsupported("attn_cfg.num_heads", None, "required by MHA")
    n_heads = attn_cfg["num_heads"]
    if not _is_int(n_heads) or n_heads < 1:
        raise MambaConfigUnsupported("attn_cfg.num_heads", n_heads, "must be a whole number >= 1")
    head_dim = attn_cfg.get("head_dim") or (d_model // n_heads)
    if not attn_cfg.get("causal", False):  # MHA's default is bidirectional
        raise MambaConfigUnsupported("attn_cfg.causal", attn_cfg.get("causal", False),
                                     "hybridlm's attention is causal; a language model needs causal = true")
    if attn_cfg.get("d_conv", 0):
        raise MambaConfigUnsupported("attn_cfg.d_conv", attn_cfg["d_conv"],
                                     "hybridlm's attention has no short convolution on q/k/v")
    if attn_cfg.get("mlp_dim", 0):
        raise MambaConfigUnsupported("attn_cfg.mlp_dim", attn_cfg["mlp_dim"],
                                     "an MLP in parallel with attention inside one residual block has no hybridlm "
                                     "block (use d_intermediate)")
    rotary_dim = attn_cfg.get("rotary_emb_dim", 0)
    if rotary_dim not in (0, head_dim):
        raise MambaConfigUnsupported("attn_cfg.rotary_emb_dim", rotary_dim,
                                     f"hybridlm rotates the whole head (rotary_emb_dim = head_dim = {head_dim}) "
                                     "or nothing (0); partial rotary has no equivalent")
    if rotary_dim and attn_cfg.get("rotary_emb_interleaved", False):
        raise MambaConfigUnsupported("attn_cfg.rotary_emb_interleaved", True,
                                     "hybridlm's rope rotates half-split pairs (i, i + head_dim/2), not interleaved "
                                     "ones")
    scale = attn_cfg.get("softmax_scale")
    if scale is not None and not math.isclose(scale, 1 / math.sqrt(head_dim), rel_tol=1e-6):
        raise MambaConfigUnsupported("attn_cfg.softmax_scale", scale,
                                     f"hybridlm's attention scales by 1/sqrt(head_dim) = {1 / math.sqrt(head_dim):.6g}")
    fields = {"n_heads": n_heads, "n_kv_heads": attn_cfg.get("num_heads_kv"), "head_dim": attn_cfg.get("head_dim"),
              "position": "rope" if rotary_dim else "nope", "rope_theta": attn_cfg.get("rotary_emb_base", 10000.0)}
    return _block_spec(AttentionSpec, fields, "attn_cfg", attn_cfg, ATTENTION_FIELD_TO_MHA)


def _block_spec(cls: type, fields: dict, section: str, section_cfg: dict, config_names: dict[str, str]):
    """Validate a block spec; a wrong type or range names the config key it came from."""
    try:
        return cls(**fields)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        key = config_names.get(field, "")
        raise MambaConfigUnsupported(f"{section}.{key}" if key else section,
                                     section_cfg.get(key) if key else section_cfg,
                                     first["msg"].removeprefix("Value error, ")) from None


# -- state_dict ------------------------------------------------------------------------------------
def convert_state_dict(sd: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Official ``MambaLMHeadModel`` state_dict -> hybridlm ``HybridLM`` state_dict for ``spec``.

    ``spec`` is the one :func:`spec_from_mamba_config` made: each mixer block starts an official
    layer and a SwiGLU block after it is that layer's MLP. Every official key must be used.
    """
    source = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in source:
            raise HybridLMError(f"the mamba_ssm weights have no {key!r}, which the config implies")
        return source.pop(key)

    out["tok_embeddings.weight"] = take("backbone.embedding.weight")
    layer = -1
    for block in spec.resolve():
        ours = f"layers.{block.index}"
        if block.spec.kind == "swiglu":
            theirs = f"backbone.layers.{layer}"
            out[f"{ours}.norm.weight"] = take(f"{theirs}.norm2.weight")
            value, gate = take(f"{theirs}.mlp.fc1.weight").chunk(2, dim=0)  # GatedMLP: y, gate = fc1(x).chunk(2)
            out[f"{ours}.mixer.w1.weight"] = gate
            out[f"{ours}.mixer.w3.weight"] = value
            out[f"{ours}.mixer.w2.weight"] = take(f"{theirs}.mlp.fc2.weight")
            _drop_zero_bias(source, f"{theirs}.mlp.fc1.bias", "d_intermediate")
            _drop_zero_bias(source, f"{theirs}.mlp.fc2.bias", "d_intermediate")
            continue
        layer += 1
        theirs = f"backbone.layers.{layer}"
        out[f"{ours}.norm.weight"] = take(f"{theirs}.norm.weight")
        prefix = f"{theirs}.mixer."
        if block.spec.kind == "attention":
            q, k, v = _split_mha_in_proj(take(f"{prefix}in_proj.weight"), block.spec, spec.d_model)
            out[f"{ours}.mixer.wq.weight"], out[f"{ours}.mixer.wk.weight"], out[f"{ours}.mixer.wv.weight"] = q, k, v
            out[f"{ours}.mixer.wo.weight"] = take(f"{prefix}out_proj.weight")
            _drop_zero_bias(source, f"{prefix}in_proj.bias", "attn_cfg.qkv_proj_bias")
            _drop_zero_bias(source, f"{prefix}out_proj.bias", "attn_cfg.out_proj_bias")
        else:  # Mamba-3 keeps the official parameter names
            for key in [k for k in source if k.startswith(prefix)]:
                out[f"{ours}.mixer.{key[len(prefix):]}"] = source.pop(key)
    out["norm.weight"] = take("backbone.norm_f.weight")
    head = source.pop("lm_head.weight", None)
    if spec.tie_embeddings:
        if head is not None and not torch.equal(head, out["tok_embeddings.weight"]):
            raise MambaConfigUnsupported("tie_embeddings", True, "lm_head.weight differs from "
                                         "backbone.embedding.weight, so the weights are not tied")
        out["output.weight"] = out["tok_embeddings.weight"]
    elif head is None:
        raise MambaConfigUnsupported("tie_embeddings", False, "the weights have no lm_head.weight")
    else:
        out["output.weight"] = head
    if source:
        keys = sorted(source)
        more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
        raise HybridLMError(f"the mamba_ssm weights have keys the config does not explain: "
                            f"{', '.join(keys[:5])}{more}")
    return out


def _split_mha_in_proj(weight: torch.Tensor, attn: AttentionSpec, d_model: int) -> tuple[torch.Tensor, ...]:
    """MHA's fused in_proj rows are [q (h, d) | k (hkv, d) | v (hkv, d)] (kv as (two, hkv, d))."""
    hd = attn.resolved_head_dim(d_model)
    widths = [attn.n_heads * hd, attn.kv_heads * hd, attn.kv_heads * hd]
    if weight.shape[0] != sum(widths):
        raise HybridLMError(f"MHA in_proj.weight has {weight.shape[0]} rows; attn_cfg implies "
                            f"{sum(widths)} (q {widths[0]} + k {widths[1]} + v {widths[2]})")
    return tuple(weight.split(widths, dim=0))


def _drop_zero_bias(source: dict[str, torch.Tensor], key: str, field: str) -> None:
    """Our blocks have no biases: an all-zero one (the official init) drops exactly, any other cannot."""
    bias = source.pop(key, None)
    if bias is not None and bias.count_nonzero():
        raise MambaConfigUnsupported(field, True, f"{key} is not zero and hybridlm's blocks have no biases")


# -- folders ----------------------------------------------------------------------------------------
def read_mamba_config(src_dir: str | Path) -> dict:
    """The ``config.json`` of a mamba_ssm model folder."""
    config_path = Path(src_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise HybridLMError(f"{src_dir} is not a mamba_ssm model folder: no {CONFIG_FILE}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise HybridLMError(f"{config_path} is not valid JSON: {err}") from None


def read_mamba_weights(src_dir: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of a mamba_ssm model folder (``model.safetensors`` or ``pytorch_model.bin``)."""
    for name in WEIGHT_FILES:
        path = Path(src_dir) / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    raise HybridLMError(f"{src_dir} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def import_mamba_ssm(src_dir: str | Path, out_dir: str | Path, *, train_seq_len: int | None = None,
                     tokenizer=None, name: str | None = None, overwrite: bool = False) -> Path:
    """Convert a mamba_ssm ``MambaLMHeadModel`` folder into a hybridlm model folder; returns ``out_dir``
    (an existing model folder there is replaced only with ``overwrite=True``).

    ``tokenizer``: anything :func:`hybridlm.load_tokenizer` takes; by default the source folder's
    ``tokenizer.json`` when it has one, else the byte tokenizer. Weights are stored in fp32.
    """
    from hybridlm.builder.io.pretrained import check_save_target, save_pretrained
    from hybridlm.tokenizer import TOKENIZER_FILE, load_tokenizer

    check_save_target(out_dir, overwrite=overwrite)  # before the source is read
    src = Path(src_dir)
    config = read_mamba_config(src)
    spec = spec_from_mamba_config(config, name=name or src.resolve().name)  # refuse a config before reading weights
    official = read_mamba_weights(src)
    _check_vocab_rows(official, spec, config)
    weights = convert_state_dict(official, spec)
    model = HybridLM(spec, device="meta").to_empty(device="cpu")
    _check_shapes(weights, model)
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
    if tokenizer is None and (src / TOKENIZER_FILE).is_file():
        tokenizer = src / TOKENIZER_FILE
    metadata = {"imported_from": "mamba_ssm", "source": str(src.resolve()), "mamba_config": config}
    return save_pretrained(model.eval(), out_dir, tokenizer=load_tokenizer(tokenizer), train_seq_len=train_seq_len,
                           metadata=metadata, overwrite=overwrite)


def _check_vocab_rows(official: dict[str, torch.Tensor], spec: ModelSpec, config: dict) -> None:
    emb = official.get("backbone.embedding.weight")
    if emb is not None and emb.shape[0] != spec.vocab_size:
        multiple = config.get("pad_vocab_size_multiple", MAMBA_CONFIG_DEFAULTS["pad_vocab_size_multiple"])
        raise MambaConfigUnsupported("vocab_size", config.get("vocab_size"),
                                     f"padded to a multiple of pad_vocab_size_multiple = {multiple} it gives "
                                     f"{spec.vocab_size} rows, but backbone.embedding.weight has {emb.shape[0]}")


def _check_shapes(weights: dict[str, torch.Tensor], model: HybridLM) -> None:
    """Shapes against the config's model, as one readable error (not torch's list)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k} is {list(w.shape)}, the config needs {list(expected[k])}"
                for k, w in weights.items() if k in expected and tuple(w.shape) != expected[k]]
    problems += [f"missing {k}" for k in sorted(set(expected) - set(weights))]
    problems += [f"unexpected {k}" for k in sorted(set(weights) - set(expected))]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise HybridLMError(f"the mamba_ssm weights do not match {CONFIG_FILE}: {'; '.join(problems[:3])}{more}")
