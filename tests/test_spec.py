"""ModelSpec: YAML in and out, every invalid-spec case, overrides, JSON Schema, user block kinds."""
import json
from typing import Literal

import pytest
import torch
from pydantic import Field
from torch import nn

import hybridlm
from hybridlm.builder import register_block
from hybridlm.builder.model.registry import _KINDS
from hybridlm.errors import SpecError
from hybridlm.layouts import (AttentionSpec, BlockSpec, Mamba3Spec, ModelSpec, Override, SwiGLUSpec, block_kinds,
                              dump_spec, load_spec, save_spec, spec_from_yaml, spec_json_schema)
from hybridlm.layouts.presets import PRESETS, get_preset
from hybridlm.layouts.registry import block_spec_class, unregister_block_spec

# The example spec of issue 3, verbatim.
EXAMPLE = """\
version: 1
name: tiny-hybrid
vocab_size: 256
d_model: 128
blocks:
  M: {kind: mamba3, d_state: 32, headdim: 32, out_norm: pregate_grouped}
  A: {kind: attention, n_heads: 4, n_kv_heads: 2, position: nope}
  F: {kind: swiglu, hidden: 352}
pattern: "((M F) *3 A F) *2"       # groups, repetition, whitespace-separated symbols
overrides: [{at: [0, 2], set: {d_state: 16}}]
"""


def example_in_python() -> ModelSpec:
    return ModelSpec(
        version=1, name="tiny-hybrid", vocab_size=256, d_model=128,
        blocks={"M": Mamba3Spec(d_state=32, headdim=32, out_norm="pregate_grouped"),
                "A": AttentionSpec(n_heads=4, n_kv_heads=2, position="nope"),
                "F": SwiGLUSpec(hidden=352)},
        pattern="((M F) *3 A F) *2",
        overrides=[Override(at=[0, 2], set={"d_state": 16})])


# -- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("exclude_defaults", [True, False])
def test_example_round_trips(exclude_defaults):
    spec = spec_from_yaml(EXAMPLE)
    text = dump_spec(spec, exclude_defaults=exclude_defaults)
    again = spec_from_yaml(text)
    assert again == spec
    assert dump_spec(again, exclude_defaults=exclude_defaults) == text  # dump is stable too


@pytest.mark.parametrize("exclude_defaults", [True, False])
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips(name, exclude_defaults):
    spec = get_preset(name)
    again = spec_from_yaml(dump_spec(spec, exclude_defaults=exclude_defaults))
    assert again == spec
    assert again.to_dict(exclude_defaults=False) == spec.to_dict(exclude_defaults=False)


def test_round_trip_keeps_non_default_top_level_fields():
    spec = example_in_python().model_copy(update={"tie_embeddings": False, "norm_eps": 1e-6,
                                                  "residual_in_fp32": True, "init_std": 0.01})
    again = spec_from_yaml(dump_spec(spec))
    assert again == spec
    assert (again.tie_embeddings, again.norm_eps, again.residual_in_fp32, again.init_std) == (False, 1e-6, True, 0.01)


def test_save_and_load_file(tmp_path):
    path = tmp_path / "spec.yaml"
    save_spec(example_in_python(), path)
    assert load_spec(path) == spec_from_yaml(EXAMPLE)


def test_python_spec_equals_yaml_spec():
    assert example_in_python() == spec_from_yaml(EXAMPLE)
    assert get_preset("tiny-hybrid") == spec_from_yaml(EXAMPLE)


def test_equality_sees_a_changed_field():
    other = spec_from_yaml(EXAMPLE.replace("hidden: 352", "hidden: 368"))
    assert other != spec_from_yaml(EXAMPLE)


def test_defaults_are_filled_in():
    spec = spec_from_yaml(EXAMPLE)
    m = spec.blocks["M"]
    assert (m.expand, m.ngroups, m.rope_fraction, m.mimo_rank, m.chunk_size) == (2, 1, 0.5, 1, 64)
    assert (m.discretization, m.a_activation, m.rotation, m.bc_bias, m.conv_kernel) == (
        "trapezoid", "heavy_tail", True, True, 0)
    a = spec.blocks["A"]
    assert (a.head_dim, a.rope_theta, a.qk_norm, a.window) == (None, 10000.0, False, None)
    assert a.resolved_head_dim(128) == 32
    assert spec.tie_embeddings is True and spec.version == 1


# -- invalid specs -------------------------------------------------------------------------------

def _sub(old: str, new: str) -> str:
    assert old in EXAMPLE, old
    return EXAMPLE.replace(old, new, 1)


M_LINE = "M: {kind: mamba3, d_state: 32, headdim: 32, out_norm: pregate_grouped}"
A_LINE = "A: {kind: attention, n_heads: 4, n_kv_heads: 2, position: nope}"
F_LINE = "F: {kind: swiglu, hidden: 352}"
PATTERN_LINE = 'pattern: "((M F) *3 A F) *2"'
OVERRIDE_LINE = "overrides: [{at: [0, 2], set: {d_state: 16}}]"

# id: (yaml text, exact YAML path, fragments that str(error) must contain)
INVALID = {
    "yaml-syntax": (_sub("d_model: 128", "d_model: [128"), "", ["YAML syntax error", "line 5"]),
    "yaml-tab": (_sub("d_model: 128", "d_model:\t128\n\tx: 1"), "", ["YAML syntax error"]),
    "duplicate-key": (EXAMPLE + "d_model: 64\n", "", ["duplicate key 'd_model'", "line 11"]),
    "duplicate-nested-key": (_sub("hidden: 352", "hidden: 352, hidden: 368"), "", ["duplicate key 'hidden'"]),
    "unknown-kind": (_sub(F_LINE, "F: {kind: mlp, hidden: 352}"), "blocks.F.kind", ["'mlp'", "swiglu"]),
    "kind-not-a-string": (_sub(F_LINE, "F: {kind: 3, hidden: 352}"), "blocks.F.kind", ["= 3"]),
    "missing-kind": (_sub(F_LINE, "F: {hidden: 352}"), "blocks.F.kind", ["missing"]),
    "block-not-a-mapping": (_sub(F_LINE, "F: 352"), "blocks.F", ["= 352", "mapping"]),
    "block-symbol-not-identifier": (_sub(F_LINE, "1F: {kind: swiglu}"), "blocks.1F", ["identifier"]),
    "no-blocks": (_sub("blocks:", "blocks: {}\nunused:"), "blocks", ["{}"]),
    "unknown-symbol": (_sub(PATTERN_LINE, 'pattern: "((M F) *3 B F) *2"'), "pattern",
                       ["'((M F) *3 B F) *2'", "'B'"]),
    "unbalanced-open": (_sub(PATTERN_LINE, 'pattern: "(((M F) *3 A F) *2"'), "pattern",
                        ["'(((M F) *3 A F) *2'", "unbalanced '('", "column 1"]),
    "unbalanced-close": (_sub(PATTERN_LINE, 'pattern: "((M F) *3 A F) *2)"'), "pattern",
                         ["'((M F) *3 A F) *2)'", "unbalanced ')'", "column 18"]),
    "zero-repeat": (_sub(PATTERN_LINE, 'pattern: "((M F) *0 A F) *2"'), "pattern", ["*0", "at least 1", "column 9"]),
    "empty-pattern": (_sub(PATTERN_LINE, 'pattern: ""'), "pattern", ["''", "no blocks"]),
    "pattern-bad-character": (_sub(PATTERN_LINE, 'pattern: "M, F"'), "pattern", ["'M, F'", "','"]),
    "pattern-too-deep": (_sub(PATTERN_LINE, f'pattern: "{"(" * 2000}M{")" * 2000}"'), "pattern", ["nested deeper"]),
    "pattern-not-a-string": (_sub(PATTERN_LINE, "pattern: [M, F]"), "pattern", ["['M', 'F']"]),
    "headdim-not-dividing-d_inner": (_sub("headdim: 32", "headdim: 48"), "blocks.M.headdim", ["= 48", "256"]),
    "n_kv_heads-not-dividing-n_heads": (_sub("n_kv_heads: 2", "n_kv_heads: 3"), "blocks.A.n_kv_heads", ["= 3"]),
    "n_heads-not-dividing-d_model": (_sub(A_LINE, "A: {kind: attention, n_heads: 3, n_kv_heads: 1}"),
                                     "blocks.A.n_heads", ["= 3", "128"]),
    "rope_fraction": (_sub("headdim: 32,", "headdim: 32, rope_fraction: 0.25,"), "blocks.M.rope_fraction",
                      ["0.25", "0.5 or 1.0"]),
    "odd-d_state": (_sub("d_state: 32", "d_state: 31"), "blocks.M.d_state", ["= 31", "even"]),
    "d_state-too-small-to-rotate": (_sub("d_state: 32", "d_state: 2"), "blocks.M.d_state", ["= 2", "rotat"]),
    "ngroups-not-dividing-heads": (_sub("headdim: 32,", "headdim: 32, ngroups: 3,"), "blocks.M.ngroups",
                                   ["= 3", "8"]),
    "dt_min-above-dt_max": (_sub("headdim: 32,", "headdim: 32, dt_min: 0.5,"), "blocks.M.dt_min", ["0.5"]),
    "override-index-out-of-range": (_sub("at: [0, 2]", "at: [0, 16]"), "overrides.0.at.1", ["= 16", "16 blocks"]),
    "override-index-negative": (_sub("at: [0, 2]", "at: [-1]"), "overrides.0.at.0", ["= -1"]),
    "override-field-block-lacks": (_sub("set: {d_state: 16}", "set: {n_heads: 2}"), "overrides.0.set.n_heads",
                                   ["n_heads", "mamba3"]),
    "override-field-other-kind": (_sub("at: [0, 2]", "at: [0, 1]"), "overrides.0.set.d_state", ["swiglu"]),
    "override-value-breaks-rule": (_sub("set: {d_state: 16}", "set: {headdim: 48}"), "overrides.0.set.headdim",
                                   ["= 48", "at block 0"]),
    "override-value-odd-d_state": (_sub("set: {d_state: 16}", "set: {d_state: 15}"), "overrides.0.set.d_state",
                                   ["= 15", "even"]),
    "override-value-wrong-type": (_sub("set: {d_state: 16}", "set: {d_state: big}"), "overrides.0.set.d_state",
                                  ["'big'"]),
    "override-empty-set": (_sub("set: {d_state: 16}", "set: {}"), "overrides.0.set", ["{}"]),
    "override-unknown-field": (_sub("set: {d_state: 16}", "set: {d_state: 16}, when: 1"), "overrides.0.when",
                               ["unknown field"]),
    "wrong-type-d_model": (_sub("d_model: 128", "d_model: wide"), "d_model", ["'wide'", "integer"]),
    "wrong-type-hidden": (_sub("hidden: 352", "hidden: big"), "blocks.F.hidden", ["'big'", "integer"]),
    "fractional-hidden": (_sub("hidden: 352", "hidden: 352.5"), "blocks.F.hidden", ["352.5"]),
    "wrong-type-bool-field": (_sub("headdim: 32,", "headdim: 32, rotation: maybe,"), "blocks.M.rotation",
                              ["'maybe'"]),
    "wrong-type-literal": (_sub("position: nope", "position: alibi"), "blocks.A.position", ["'alibi'"]),
    "boolean-for-d_model": (_sub("d_model: 128", "d_model: true"), "d_model", ["True"]),
    "boolean-for-hidden": (_sub("hidden: 352", "hidden: yes"), "blocks.F.hidden", ["True"]),
    "boolean-for-window": (_sub("position: nope", "position: nope, window: on"), "blocks.A.window", ["True"]),
    "boolean-for-override-index": (_sub("at: [0, 2]", "at: [true]"), "overrides.0.at", ["True"]),
    "infinite-dt_max": (_sub("headdim: 32,", "headdim: 32, dt_max: .inf,"), "blocks.M.dt_max", ["inf"]),
    "infinite-init_std": (EXAMPLE + "init_std: .inf\n", "init_std", ["inf"]),
    "negative-d_model": (_sub("d_model: 128", "d_model: -128"), "d_model", ["-128"]),
    "zero-vocab": (_sub("vocab_size: 256", "vocab_size: 0"), "vocab_size", ["= 0"]),
    "zero-n_kv_heads": (_sub("n_kv_heads: 2", "n_kv_heads: 0"), "blocks.A.n_kv_heads", ["= 0"]),
    "missing-required-top-level": (_sub("d_model: 128\n", ""), "d_model", ["missing"]),
    "missing-required-block-field": (_sub(A_LINE, "A: {kind: attention, position: nope}"), "blocks.A.n_heads",
                                     ["missing"]),
    "unknown-top-level-field": (EXAMPLE + "dropout: 0.1\n", "dropout", ["0.1", "unknown field"]),
    "unknown-block-field": (_sub("hidden: 352", "hidden: 352, bias: true"), "blocks.F.bias", ["True", "unknown field"]),
    "wrong-version": (_sub("version: 1", "version: 2"), "version", ["= 2"]),
    "not-a-mapping": ("- 1\n- 2\n", "", ["[1, 2]", "mapping"]),
    "scalar-document": ("hello\n", "", ["'hello'", "mapping"]),
    "empty-file": ("", "", ["empty"]),
    "comment-only-file": ("# nothing here\n", "", ["empty"]),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_spec_raises_spec_error_with_yaml_path(case):
    text, path, fragments = INVALID[case]
    with pytest.raises(SpecError) as info:
        spec_from_yaml(text)
    err = info.value
    assert type(err) is SpecError
    assert err.path == path, str(err)
    message = str(err)
    assert message.startswith(path or "<spec>"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message  # one line, as the CLI prints it


def test_error_carries_the_value():
    with pytest.raises(SpecError) as info:
        spec_from_yaml(_sub("headdim: 32", "headdim: 48"))
    assert info.value.value == 48 and info.value.has_value
    assert "multiple of headdim" in info.value.reason


def test_python_construction_raises_spec_error_too():
    with pytest.raises(SpecError) as info:
        ModelSpec(vocab_size=256, d_model=128, blocks={"F": SwiGLUSpec()}, pattern="F G")
    assert info.value.path == "pattern"
    with pytest.raises(SpecError) as info:
        ModelSpec.model_validate({"vocab_size": 256, "d_model": 128, "blocks": {"F": {"kind": "swiglu", "hidden": 0}},
                                  "pattern": "F"})
    assert info.value.path == "blocks.F.hidden"


def test_load_spec_of_a_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.yaml")


# -- resolve, layer types, to_dict ---------------------------------------------------------------

def test_overrides_apply_only_at_listed_indices():
    spec = spec_from_yaml(EXAMPLE)
    resolved = spec.resolve()
    assert [r.index for r in resolved] == list(range(16))
    assert [r.symbol for r in resolved] == list("MFMFMFAF") * 2
    d_states = {r.index: r.spec.d_state for r in resolved if r.symbol == "M"}
    assert d_states == {0: 16, 2: 16, 4: 32, 8: 32, 10: 32, 12: 32}
    assert [r.index for r in resolved if r.overridden] == [0, 2]
    assert spec.blocks["M"].d_state == 32  # the definition itself is unchanged
    for r in resolved:  # everything else is the block's definition
        if not r.overridden:
            assert r.spec == spec.blocks[r.symbol]
        else:
            assert r.spec.model_dump(exclude={"d_state"}) == spec.blocks["M"].model_dump(exclude={"d_state"})


def test_several_overrides_later_ones_win():
    text = _sub(OVERRIDE_LINE, "overrides: [{at: [0, 2], set: {d_state: 16}}, {at: 2, set: {d_state: 8, "
                               "mimo_rank: 2}}, {at: [7], set: {hidden: 64}}]")
    resolved = spec_from_yaml(text).resolve()
    assert resolved[0].spec.d_state == 16 and resolved[0].spec.mimo_rank == 1
    assert resolved[2].spec.d_state == 8 and resolved[2].spec.mimo_rank == 2
    assert resolved[7].spec.hidden == 64 and resolved[5].spec.hidden == 352
    assert [r.index for r in resolved if r.overridden] == [0, 2, 7]


def test_layer_types():
    spec = spec_from_yaml(EXAMPLE)
    want = ["linear_attention"] * 3 + ["full_attention"]
    assert spec.layer_types() == want * 2
    assert get_preset("transformer-tiny").layer_types() == ["full_attention"] * 6
    assert get_preset("mamba3-tiny").layer_types() == ["linear_attention"] * 6


def test_n_blocks_and_compact_pattern():
    spec = spec_from_yaml(_sub(PATTERN_LINE, 'pattern: "M F M F M F A F M F M F M F A F"'))
    assert spec.n_blocks == 16
    assert spec.compact_pattern() == "((M F) *3 A F) *2"


def test_to_dict_key_order():
    spec = spec_from_yaml(EXAMPLE)
    d = spec.to_dict()
    assert list(d) == ["version", "name", "vocab_size", "d_model", "blocks", "pattern", "overrides"]
    assert list(d["blocks"]) == ["M", "A", "F"]
    assert d["blocks"]["M"] == {"kind": "mamba3", "d_state": 32, "headdim": 32, "out_norm": "pregate_grouped"}
    assert list(d["blocks"]["A"])[0] == "kind"
    assert d["overrides"] == [{"at": [0, 2], "set": {"d_state": 16}}]
    full = spec.to_dict(exclude_defaults=False)
    assert list(full) == ["version", "name", "vocab_size", "d_model", "tie_embeddings", "norm_eps",
                          "residual_in_fp32", "init_std", "blocks", "pattern", "overrides"]
    assert list(full["blocks"]["M"])[:4] == ["kind", "d_state", "expand", "headdim"]
    assert set(full["blocks"]["M"]) == {"kind"} | (set(Mamba3Spec.model_fields) - {"kind"})
    no_overrides = spec.model_copy(update={"overrides": []})
    assert "overrides" not in no_overrides.to_dict()


def test_dump_is_yaml_in_the_documented_order():
    text = dump_spec(spec_from_yaml(EXAMPLE))
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "-"))]
    assert keys == ["version", "name", "vocab_size", "d_model", "blocks", "pattern", "overrides"]


# -- JSON Schema -----------------------------------------------------------------------------------

def _block_schema_refs(schema):
    blocks = schema["properties"]["blocks"]["additionalProperties"]
    return blocks["oneOf"], blocks["discriminator"]["mapping"]


def test_json_schema_is_json_with_one_of_over_kinds():
    schema = json.loads(json.dumps(spec_json_schema()))
    one_of, mapping = _block_schema_refs(schema)
    assert set(mapping) == set(block_kinds()) >= {"mamba3", "attention", "swiglu"}
    assert sorted(o["$ref"] for o in one_of) == sorted(mapping.values())
    for kind, ref in mapping.items():
        name = ref.rsplit("/", 1)[-1]
        sub = schema["$defs"][name]
        assert sub["properties"]["kind"].get("const", sub["properties"]["kind"].get("enum", [None])[0]) == kind
        assert sub.get("additionalProperties") is False
    assert "BlockSpec" not in schema["$defs"]
    assert set(schema["required"]) >= {"vocab_size", "d_model", "blocks", "pattern"}
    m = schema["$defs"]["Mamba3Spec"]["properties"]
    assert m["d_state"]["default"] == 128 and m["headdim"]["default"] == 64


def _validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = spec_json_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_schema_validates_presets(name):
    validator = _validator()
    spec = get_preset(name)
    validator.validate(spec.to_dict())
    validator.validate(json.loads(json.dumps(spec.to_dict(exclude_defaults=False))))


def test_json_schema_rejects_bad_blocks():
    validator = _validator()
    d = get_preset("tiny-hybrid").to_dict()
    d["blocks"]["F"] = {"kind": "swiglu", "hidden": 352, "bias": True}
    assert not validator.is_valid(d)
    d["blocks"]["F"] = {"kind": "mlp", "hidden": 352}
    assert not validator.is_valid(d)
    d = get_preset("tiny-hybrid").to_dict()
    del d["d_model"]
    assert not validator.is_valid(d)


# -- user block kinds --------------------------------------------------------------------------------

class ScaleSpec(BlockSpec):
    """A toy block: proj(x) * scale, with ``groups`` that must divide d_model."""

    kind: Literal["scale"] = "scale"
    init: float = Field(1.0, gt=0)
    groups: int = Field(1, ge=1)

    def problems(self, d_model):
        if d_model % self.groups:
            yield "groups", f"must divide d_model ({d_model})"


class ScaleBlock(nn.Module):
    """proj(x) * scale (per group). Sets ``scale`` in its constructor only."""

    def __init__(self, d_model, init, groups, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.init = float(init)
        self.proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        self.scale = nn.Parameter(torch.full((groups,), self.init, device=device, dtype=dtype))

    def forward(self, x, cu_seqlens=None, cache=None):
        y = self.proj(x)
        return (y.unflatten(-1, (self.groups, -1)) * self.scale[:, None]).flatten(-2)


class ResettableScaleBlock(ScaleBlock):
    """The same block with a ``reset_parameters`` (which the init recipe calls)."""

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.proj.weight, std=0.02)
        self.scale.fill_(self.init)


def _builder(module_cls):
    def build(spec, d_model, layer_idx, **ctx):
        return module_cls(d_model, spec.init, spec.groups, device=ctx.get("device"), dtype=ctx.get("dtype"))
    return build


build_scale = _builder(ResettableScaleBlock)


@pytest.fixture(params=[ResettableScaleBlock])
def scale_kind(request):
    assert "scale" not in _KINDS and block_spec_class("scale") is None
    register_block("scale", ScaleSpec, _builder(request.param), out_projections=("proj",))
    try:
        yield request.param
    finally:
        unregister_block_spec("scale")
        _KINDS.pop("scale", None)


SCALE_YAML = """\
name: scaled
vocab_size: 32
d_model: 16
blocks:
  M: {kind: mamba3, d_state: 8, headdim: 8}
  S: {kind: scale, init: 2.0, groups: 4}
  F: {kind: swiglu, hidden: 32}
pattern: "(M S F) *2"
overrides: [{at: [4], set: {init: 0.5}}]
"""


def test_user_block_parses_and_round_trips(scale_kind):
    spec = spec_from_yaml(SCALE_YAML)
    assert isinstance(spec.blocks["S"], ScaleSpec)
    assert (spec.blocks["S"].init, spec.blocks["S"].groups) == (2.0, 4)
    assert [r.spec.init for r in spec.resolve() if r.symbol == "S"] == [2.0, 0.5]
    assert spec_from_yaml(dump_spec(spec)) == spec
    assert "scale" in block_kinds()
    _, mapping = _block_schema_refs(spec_json_schema())
    assert mapping["scale"].endswith("/ScaleSpec")


@pytest.mark.parametrize("old,new,path", [
    ("init: 2.0", "init: -1.0", "blocks.S.init"),
    ("groups: 4", "groups: 3", "blocks.S.groups"),
    ("groups: 4", "groups: 4, gain: 1", "blocks.S.gain"),
    ("init: 0.5", "init: zero", "overrides.0.set.init"),
    ("init: 0.5", "d_state: 8", "overrides.0.set.d_state"),
])
def test_user_block_errors_name_yaml_paths(scale_kind, old, new, path):
    with pytest.raises(SpecError) as info:
        spec_from_yaml(SCALE_YAML.replace(old, new))
    assert info.value.path == path


def test_user_block_builds_and_runs(scale_kind):
    spec = spec_from_yaml(SCALE_YAML)
    model = hybridlm.build_model(spec, seed=0).eval()
    blocks = [layer.mixer for layer in model.layers if isinstance(layer.mixer, ScaleBlock)]
    assert [type(layer.mixer) for layer in model.layers][1::3] == [scale_kind, scale_kind]
    assert len(blocks) == 2
    assert blocks[0].scale.tolist() == [2.0] * 4 and blocks[1].scale.tolist() == [0.5] * 4
    # the init recipe treats the declared out projection as a residual-stream writer: std / sqrt(6 blocks)
    assert abs(blocks[0].proj.weight.std().item() - spec.init_std / 6 ** 0.5) < 0.002
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, 7, 32) and torch.isfinite(logits).all()
        blocks[0].scale.mul_(3.0)
        changed = model(ids)
    assert not torch.allclose(logits, changed)


def test_user_block_without_reset_parameters_keeps_its_constructor_values():
    register_block("scale", ScaleSpec, _builder(ScaleBlock), out_projections=("proj",))
    try:
        model = hybridlm.build_model(spec_from_yaml(SCALE_YAML), seed=0)
        scales = [layer.mixer.scale.tolist() for layer in model.layers if isinstance(layer.mixer, ScaleBlock)]
    finally:
        unregister_block_spec("scale")
        _KINDS.pop("scale", None)
    assert scales == [[2.0] * 4, [0.5] * 4]


def test_user_kind_is_gone_after_cleanup():
    assert "scale" not in block_kinds()
    assert "scale" not in _KINDS
    with pytest.raises(SpecError) as info:
        spec_from_yaml(SCALE_YAML)
    assert info.value.path == "blocks.S.kind"


def test_register_block_checks_the_kind_literal():
    with pytest.raises(ValueError, match="kind"):
        register_block("other", ScaleSpec, build_scale)
    assert "other" not in _KINDS and block_spec_class("other") is None


def test_override_value_checked_even_when_a_later_override_replaces_it():
    text = """
version: 1
vocab_size: 64
d_model: 32
blocks:
  M: {kind: mamba3, d_state: 8, headdim: 8}
pattern: "M M"
overrides:
  - {at: [0], set: {d_state: bad}}
  - {at: [0], set: {d_state: 16}}
"""
    with pytest.raises(SpecError) as info:
        spec_from_yaml(text)
    assert info.value.path == "overrides.0.set.d_state" and info.value.value == "bad"


def test_backend_field_reaches_the_mixer():
    from hybridlm.builder import build_model

    text = """
vocab_size: 256
d_model: 64
blocks:
  M: {kind: mamba3, d_state: 16, headdim: 16, backend: sequential}
pattern: M
"""
    model = build_model(spec_from_yaml(text), seed=0)
    assert model.layers[0].mixer.backend == "sequential"
    with pytest.raises(SpecError, match="backend"):
        spec_from_yaml(text.replace("sequential", "cuda"))
