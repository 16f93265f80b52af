"""Hypothesis: generated valid specs round-trip, build and run; mutated ones raise SpecError only."""
import copy

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridlm.builder import build_model
from hybridlm.errors import SpecError
from hybridlm.layouts import dump_spec, spec_from_yaml

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_EXPANDED = 10  # blocks in the expanded pattern; keeps every example fast


def _divisors(n, lo=1, hi=None):
    return [k for k in range(lo, (hi or n) + 1) if n % k == 0]


# -- valid specs ---------------------------------------------------------------------------------

@st.composite
def mamba3_block(draw, d_model):
    expand = draw(st.sampled_from([1, 2]))
    d_inner = expand * d_model
    headdim = draw(st.sampled_from([h for h in (4, 8, 16) if d_inner % h == 0]))
    nheads = d_inner // headdim
    block = {
        "kind": "mamba3",
        "d_state": draw(st.sampled_from([4, 8, 16])),
        "expand": expand,
        "headdim": headdim,
        "ngroups": draw(st.sampled_from(_divisors(nheads, hi=4))),
        "rope_fraction": draw(st.sampled_from([0.5, 1.0])),
        "mimo_rank": draw(st.integers(1, 2)),
        "a_activation": draw(st.sampled_from(["heavy_tail", "softplus"])),
        "discretization": draw(st.sampled_from(["trapezoid", "euler", "half"])),
        "rotation": draw(st.booleans()),
        "bc_bias": draw(st.booleans()),
        "conv_kernel": draw(st.sampled_from([0, 2])),
        "out_norm": draw(st.sampled_from(["none", "pregate_grouped", "pregate_default", "postgate_grouped",
                                          "postgate_default"])),
        "chunk_size": draw(st.sampled_from([2, 4, 64])),
    }
    # leave some fields out so defaults are exercised too
    optional = ["ngroups", "rope_fraction", "mimo_rank", "a_activation", "discretization", "rotation", "bc_bias",
                "conv_kernel", "out_norm", "chunk_size", "expand"]
    drop = draw(st.sets(st.sampled_from(optional), max_size=4))
    for key in drop:
        if key == "expand" and expand != 2:
            continue  # the default (2) would change d_inner and so the valid headdim/ngroups
        if key == "ngroups" and block["ngroups"] != 1:
            continue
        block.pop(key)
    return block


@st.composite
def attention_block(draw, d_model):
    position = draw(st.sampled_from(["rope", "nope"]))
    explicit_head_dim = draw(st.booleans())
    if explicit_head_dim:
        n_heads = draw(st.integers(1, 4))
        head_dim = draw(st.sampled_from([2, 4, 8] if position == "rope" else [3, 4, 8]))
    else:
        n_heads = draw(st.sampled_from([h for h in _divisors(d_model, hi=8)
                                        if position == "nope" or (d_model // h) % 2 == 0]))
        head_dim = None
    block = {"kind": "attention", "n_heads": n_heads, "position": position}
    if head_dim is not None:
        block["head_dim"] = head_dim
    kv = draw(st.none() | st.sampled_from(_divisors(n_heads)))
    if kv is not None:
        block["n_kv_heads"] = kv
    if draw(st.booleans()):
        block["window"] = draw(st.integers(1, 6))
    if draw(st.booleans()):
        block["qk_norm"] = True
    if position == "rope" and draw(st.booleans()):
        block["rope_theta"] = draw(st.sampled_from([100.0, 10000.0, 500000.0]))
    return block


@st.composite
def swiglu_block(draw, d_model):
    block = {"kind": "swiglu"}
    if draw(st.booleans()):
        block["hidden"] = draw(st.integers(1, 64))
    return block


KIND_OF = {"M": mamba3_block, "A": attention_block, "F": swiglu_block}


@st.composite
def pattern(draw, symbols, budget=4):
    """A pattern of at most ``budget`` symbol occurrences, with groups and repeats, and its expansion."""

    def seq(depth, budget):
        texts, expanded, used = [], [], 0
        n = draw(st.integers(1, max(1, min(3, budget))))
        for _ in range(n):
            if used >= budget:
                break
            if depth < 2 and budget - used >= 2 and draw(st.booleans()):
                inner_text, inner, inner_used = seq(depth + 1, budget - used)
                text, items = f"({inner_text})", inner
                used += inner_used
            else:
                sym = draw(st.sampled_from(symbols))
                text, items = sym, [sym]
                used += 1
            if draw(st.booleans()):
                count = draw(st.integers(1, 3))
                if len(expanded) + len(items) * count <= MAX_EXPANDED:
                    text += draw(st.sampled_from([" *{}", "*{}", " * {}", "* {}"])).format(count)
                    items = items * count
            texts.append(text)
            expanded += items
        return draw(st.sampled_from([" ", "  ", "\t"])).join(texts), expanded, used

    text, expanded, _ = seq(0, budget)
    return text, expanded


OVERRIDABLE = {
    "M": lambda: st.fixed_dictionaries({}, optional={
        "d_state": st.sampled_from([4, 8]), "mimo_rank": st.integers(1, 2), "discretization":
        st.sampled_from(["trapezoid", "euler", "half"]), "out_norm": st.sampled_from(["none", "postgate_grouped"]),
        "bc_bias": st.booleans(), "chunk_size": st.sampled_from([2, 8])}),
    "A": lambda: st.fixed_dictionaries({}, optional={
        "qk_norm": st.booleans(), "window": st.none() | st.integers(1, 4), "position": st.just("nope")}),
    "F": lambda: st.fixed_dictionaries({}, optional={"hidden": st.integers(1, 48)}),
}


@st.composite
def valid_spec(draw):
    """(spec as plain data, expanded symbols, {index: overridden fields})"""
    d_model = draw(st.sampled_from([8, 16, 24, 32, 48, 64]))
    symbols = draw(st.lists(st.sampled_from(["M", "A", "F"]), min_size=1, max_size=3, unique=True))
    text, expanded = draw(pattern(symbols))
    used = list(dict.fromkeys(expanded))  # only blocks that appear are defined
    blocks = {s: draw(KIND_OF[s](d_model)) for s in used}
    data = {"version": 1, "name": draw(st.sampled_from(["gen", "x-y_1"])), "vocab_size": draw(st.integers(2, 64)),
            "d_model": d_model, "blocks": blocks, "pattern": text}
    if draw(st.booleans()):
        data["tie_embeddings"] = draw(st.booleans())
    if draw(st.booleans()):
        data["residual_in_fp32"] = draw(st.booleans())
    overrides, applied = [], {}
    for _ in range(draw(st.integers(0, 2))):
        sym = draw(st.sampled_from(used))
        where = [i for i, s in enumerate(expanded) if s == sym]
        at = draw(st.lists(st.sampled_from(where), min_size=1, max_size=2, unique=True))
        changes = draw(OVERRIDABLE[sym]())
        if not changes:
            continue
        overrides.append({"at": at, "set": changes})
        for i in at:
            applied.setdefault(i, {}).update(changes)
    if overrides:
        data["overrides"] = overrides
    return data, expanded, applied


@SETTINGS
@given(valid_spec(), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_valid_specs_round_trip_build_and_run(generated, seq_len, seed):
    data, expanded, applied = generated
    spec = spec_from_yaml(yaml.safe_dump(data, sort_keys=False))

    # layout and overrides as generated
    assert spec.symbols() == expanded
    resolved = spec.resolve()
    for r in resolved:
        want = {**data["blocks"][r.symbol], **applied.get(r.index, {})}
        got = r.spec.model_dump()
        assert {k: got[k] for k in want} == want
        assert r.overridden == (r.index in applied)

    # YAML round trip, with and without defaults
    assert spec_from_yaml(dump_spec(spec)) == spec
    assert spec_from_yaml(dump_spec(spec, exclude_defaults=False)) == spec

    # build and run
    model = build_model(spec, seed=seed % 1000).eval()
    assert len(model.layers) == len(expanded)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (2, seq_len), generator=g)
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, seq_len, spec.vocab_size)
    assert torch.isfinite(logits).all()


# -- invalid specs ---------------------------------------------------------------------------------

INT_FIELDS = {
    "mamba3": ["d_state", "expand", "headdim", "ngroups", "mimo_rank", "chunk_size"],
    "attention": ["n_heads", "n_kv_heads", "head_dim", "window"],
    "swiglu": ["hidden"],
}
FLOAT_FIELDS = {"mamba3": ["dt_min", "dt_max", "A_floor"], "attention": ["rope_theta"], "swiglu": []}


def _nheads(d, m):
    return m.get("expand", 2) * d["d_model"] // m.get("headdim", 64)


@st.composite
def mutation(draw, d, expanded):
    """Apply one mutation to ``d`` in place; return the YAML path the error must name (None: any path)."""
    used = list(d["blocks"])
    sym = draw(st.sampled_from(used))
    block = d["blocks"][sym]
    kind = block["kind"]
    choices = ["top-nonpositive", "block-nonpositive", "top-wrong-type", "block-wrong-type", "bool-for-int",
               "inf-float", "unknown-top-field", "unknown-block-field", "unknown-kind", "missing-kind",
               "bad-pattern", "undefined-symbol", "override-out-of-range", "override-field-missing",
               "wrong-version", "missing-required", "pattern-not-string", "block-not-mapping"]
    if "M" in used:
        choices += ["odd-d_state", "headdim-not-dividing", "ngroups-not-dividing", "rope-fraction"]
    if "A" in used:
        choices += ["kv-not-dividing"]
    if d.get("overrides"):
        choices += ["override-unknown-field", "override-bad-value"]
    which = draw(st.sampled_from(choices))

    if which == "top-nonpositive":
        field = draw(st.sampled_from(["d_model", "vocab_size"]))
        d[field] = draw(st.integers(-5, 0))
        return field
    if which == "block-nonpositive":
        field = draw(st.sampled_from(INT_FIELDS[kind]))
        if field == "d_state":
            d["blocks"][sym][field] = draw(st.sampled_from([-4, -2, 0]))
        else:
            d["blocks"][sym][field] = draw(st.integers(-3, 0))
        return f"blocks.{sym}.{field}"
    if which == "top-wrong-type":
        field, value = draw(st.sampled_from([
            ("d_model", "wide"), ("d_model", [8]), ("vocab_size", 3.5), ("vocab_size", {"n": 1}),
            ("tie_embeddings", "maybe"), ("norm_eps", "small"), ("name", 7), ("overrides", "none")]))
        d[field] = value
        return field
    if which == "block-wrong-type":
        field = draw(st.sampled_from(INT_FIELDS[kind] + {"mamba3": ["rotation", "out_norm", "discretization"],
                                                         "attention": ["position", "qk_norm"],
                                                         "swiglu": []}[kind]))
        value = draw(st.sampled_from(["lots", [1, 2], {"a": 1}, 2.5]))
        if field in ("rotation", "qk_norm"):
            value = draw(st.sampled_from(["lots", [1], 2.5]))
        d["blocks"][sym][field] = value
        return f"blocks.{sym}.{field}"
    if which == "bool-for-int":
        target = draw(st.sampled_from(["top", "block"]))
        if target == "top":
            field = draw(st.sampled_from(["d_model", "vocab_size"]))
            d[field] = draw(st.booleans())
            return field
        field = draw(st.sampled_from(INT_FIELDS[kind]))
        d["blocks"][sym][field] = draw(st.booleans())
        return f"blocks.{sym}.{field}"
    if which == "inf-float":
        value = draw(st.sampled_from([float("inf"), float("-inf"), float("nan")]))
        if FLOAT_FIELDS[kind] and draw(st.booleans()):
            field = draw(st.sampled_from(FLOAT_FIELDS[kind]))
            d["blocks"][sym][field] = value
            return f"blocks.{sym}.{field}"
        field = draw(st.sampled_from(["norm_eps", "init_std"]))
        d[field] = value
        return field
    if which == "unknown-top-field":
        field = "x_" + draw(st.text("abcdefghij_", min_size=1, max_size=6))
        d[field] = draw(st.integers(0, 3))
        return field
    if which == "unknown-block-field":
        field = "x_" + draw(st.text("abcdefghij_", min_size=1, max_size=6))
        d["blocks"][sym][field] = 1
        return f"blocks.{sym}.{field}"
    if which == "unknown-kind":
        d["blocks"][sym]["kind"] = draw(st.sampled_from(["mlp", "mamba2", "Attention", "", 3]))
        return f"blocks.{sym}.kind"
    if which == "missing-kind":
        del d["blocks"][sym]["kind"]
        return f"blocks.{sym}.kind"
    if which == "bad-pattern":
        p = d["pattern"]
        d["pattern"] = draw(st.sampled_from([f"({p}", f"{p})", f"{p} *0", f"({p}) *0", f"{p} *", f"*2 {p}",
                                             f"{p} 3", f"{p} $", f"{p} ()", "", "   ", f"{p}, {p}"]))
        return "pattern"
    if which == "undefined-symbol":
        d["pattern"] = d["pattern"] + " " + draw(st.sampled_from(["Z", "MF", "m", "B_1"]))
        return "pattern"
    if which == "override-out-of-range":
        idx = draw(st.sampled_from([len(expanded), len(expanded) + 7, -1, -len(expanded) - 1]))
        d.setdefault("overrides", []).append({"at": [idx], "set": {"hidden": 8}})
        return f"overrides.{len(d['overrides']) - 1}.at.0"
    if which == "override-field-missing":
        idx = draw(st.sampled_from(range(len(expanded))))
        lacking = {"mamba3": "n_heads", "attention": "d_state", "swiglu": "headdim"}[
            d["blocks"][expanded[idx]]["kind"]]
        d["overrides"] = [{"at": [idx], "set": {lacking: 2}}]  # replaces any valid ones
        return f"overrides.0.set.{lacking}"
    if which == "wrong-version":
        d["version"] = draw(st.sampled_from([0, 2, "1", None, "one"]))
        return "version"
    if which == "missing-required":
        field = draw(st.sampled_from(["vocab_size", "d_model", "blocks", "pattern"]))
        del d[field]
        return field
    if which == "pattern-not-string":
        d["pattern"] = draw(st.sampled_from([3, ["M"], {"M": 1}, None]))
        return "pattern"
    if which == "block-not-mapping":
        d["blocks"][sym] = draw(st.sampled_from([None, 3, "swiglu", ["kind", "swiglu"]]))
        return f"blocks.{sym}"
    if which == "odd-d_state":
        d["blocks"]["M"]["d_state"] = draw(st.sampled_from([3, 5, 7, 9, 33]))
        return "blocks.M.d_state"
    if which == "headdim-not-dividing":
        m = d["blocks"]["M"]
        d_inner = m.get("expand", 2) * d["d_model"]
        m["headdim"] = draw(st.sampled_from([h for h in range(3, d_inner + 2) if d_inner % h]))
        return "blocks.M.headdim"
    if which == "ngroups-not-dividing":
        m = d["blocks"]["M"]
        nheads = _nheads(d, m)
        m["ngroups"] = draw(st.sampled_from([g for g in range(2, nheads + 3) if nheads % g]))
        return "blocks.M.ngroups"
    if which == "rope-fraction":
        d["blocks"]["M"]["rope_fraction"] = draw(st.sampled_from([0.0, 0.25, 0.75, 2.0, -0.5]))
        return "blocks.M.rope_fraction"
    if which == "kv-not-dividing":
        a = d["blocks"]["A"]
        a["n_kv_heads"] = draw(st.sampled_from([k for k in range(2, a["n_heads"] + 3) if a["n_heads"] % k]))
        return "blocks.A.n_kv_heads"
    if which == "override-unknown-field":
        d["overrides"][0]["when"] = "always"
        return "overrides.0.when"
    if which == "override-bad-value":
        last = len(d["overrides"]) - 1  # the last override wins where several set one field
        ov = d["overrides"][last]
        field = next(iter(ov["set"]))
        ov["set"][field] = draw(st.sampled_from(["bad", [1], {"x": 1}]))
        return f"overrides.{last}.set.{field}"
    raise AssertionError(which)


@SETTINGS
@given(st.data())
def test_invalid_specs_raise_spec_error_only(data):
    d, expanded, _ = data.draw(valid_spec())
    d = copy.deepcopy(d)
    path = data.draw(mutation(d, expanded))
    text = yaml.safe_dump(d, sort_keys=False)
    with pytest.raises(SpecError) as info:
        spec_from_yaml(text)
    assert info.value.path == path, (str(info.value), text)
    assert "\n" not in str(info.value)


def test_valid_spec_strategy_reaches_every_kind():
    """The strategy reaches every block kind and overrides (guards against a silently narrowed strategy)."""
    seen = set()

    @settings(max_examples=60, deadline=None, database=None)
    @given(valid_spec())
    def collect(generated):
        data, expanded, applied = generated
        seen.update(b["kind"] for b in data["blocks"].values())
        if applied:
            seen.add("overrides")
        if len(expanded) > 4:
            seen.add("repeats")

    collect()
    assert {"mamba3", "attention", "swiglu", "overrides", "repeats"} <= seen
