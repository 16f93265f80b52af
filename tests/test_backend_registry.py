"""The one kernel backend registry (hybridlm/kernels/registry.py): registered names reach the spec,
fallback and its one warning, broken optional packages, and the choice kept out of dynamo's graph."""
import warnings

import pytest
import torch

from hybridlm.errors import BackendUnavailable, SpecError
from hybridlm.kernels import dispatch, registry
from hybridlm.kernels.registry import Op
from hybridlm.layouts import backends as names
from hybridlm.layouts import spec_from_yaml

SPEC = """
version: 1
name: mine
d_model: 32
vocab_size: 64
pattern: "M"
blocks:
  M: {kind: mamba3, d_state: 16, headdim: 16, chunk_size: 8, backend: %s}
"""


@pytest.fixture
def scratch(monkeypatch):
    """Backends registered in a test vanish after it; nothing loaded or warned before it counts."""
    monkeypatch.setattr(registry, "_BACKENDS", {kind: dict(b) for kind, b in registry._BACKENDS.items()})
    monkeypatch.setattr(names, "_NAMES", {kind: list(n) for kind, n in names._NAMES.items()})
    monkeypatch.delenv("HYBRIDLM_BACKEND", raising=False)
    monkeypatch.delenv("HYBRIDLM_ATTENTION", raising=False)
    registry.reset()
    yield
    registry.reset()


def doubled(q, k, x, *args, **kwargs):
    return 2 * x


def scan_args():
    q = torch.randn(1, 4, 1, 1, 16)  # (B, L, R, G, N)
    x = torch.randn(1, 4, 2, 16)  # (B, L, H, P)
    return q, q.clone(), x, torch.rand(1, 4, 2), torch.rand(1, 4, 2), torch.rand(1, 4, 2), None


def test_spec_names_are_the_registered_backends():
    for kind in ("mamba3", "attention"):
        assert names.backend_names(kind)[1:] == list(registry._BACKENDS[kind]), kind


def test_a_registered_backend_is_a_valid_spec_backend_and_runs(scratch):
    with pytest.raises(SpecError, match=r"blocks\.M\.backend.*unknown mamba3 backend 'mine'"):
        spec_from_yaml(SPEC % "mine")
    registry.register_backend("mamba3", "mine", {"scan": doubled}, fallback="reference")
    import hybridlm

    model = hybridlm.build_model(spec_from_yaml(SPEC % "mine"))
    assert model.layers[0].mixer.backend == "mine"
    q, k, x, *rest = scan_args()
    assert torch.equal(dispatch.mamba3_scan(q, k, x, *rest, backend="mine"), 2 * x)
    # the step is not its own: its fallback's, without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.choose("mamba3", "step", "mine", "cpu", None) == "reference"
    with pytest.raises(SpecError, match=r"blocks\.M\.backend"):
        spec_from_yaml(SPEC % "mien")


def test_refused_inputs_fall_back_with_one_warning(scratch):
    refuse = Op(doubled, lambda device, q, x, angle: f"x is {x[1]}" if x[1] != torch.float32 else None)
    registry.register_backend("mamba3", "picky", {"scan": refuse}, fallback="reference")
    q, k, x, *rest = (t.double() if t is not None else None for t in scan_args())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = dispatch.mamba3_scan(q, k, x, *rest, backend="picky")
    messages = [str(w.message) for w in caught]
    assert messages == ["mamba3 scan: backend 'picky' cannot take these inputs (x is torch.float64); "
                        "using 'reference'"], messages
    assert not torch.equal(out, 2 * x)
    q, k, x, *rest = scan_args()
    assert torch.equal(dispatch.mamba3_scan(q, k, x, *rest, backend="picky"), 2 * x)


def test_a_strict_backend_asked_by_name_raises_and_auto_falls_back(scratch):
    refuse = Op(doubled, lambda device, *check: "never")
    registry.register_backend("mamba3", "strict", {"scan": refuse}, fallback="reference", strict=True,
                              auto_priority=99)
    q, k, x, *rest = scan_args()
    with pytest.raises(BackendUnavailable, match="'strict' cannot run scan: never"):
        dispatch.mamba3_scan(q, k, x, *rest, backend="strict")
    with pytest.warns(UserWarning, match="'strict' cannot take these inputs"):
        out = dispatch.mamba3_scan(q, k, x, *rest)  # auto starts at the highest priority
    assert not torch.equal(out, 2 * x)


def test_a_broken_optional_package_warns_once_and_an_absent_one_is_quiet(scratch):
    loads = []

    def broken():
        loads.append(1)
        raise RuntimeError("CUDA driver too old")

    registry.register_backend("mamba3", "broken", load=broken, fallback="reference", auto_priority=99)
    q, k, x, *rest = scan_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            dispatch.mamba3_scan(q, k, x, *rest)
    assert [str(w.message) for w in caught] == [
        "mamba3 backend 'broken' installed but unusable: CUDA driver too old; using 'reference'"]
    assert len(loads) == 1  # tried once, remembered
    with pytest.raises(BackendUnavailable, match="'broken' cannot run: installed but unusable: CUDA driver"):
        dispatch.mamba3_scan(q, k, x, *rest, backend="broken")

    registry.register_backend("mamba3", "absent", load=broken, fallback="reference", auto_priority=100,
                              installed=lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.choose("mamba3", "scan", None, "cpu", None, None, None, None) == "reference"


def test_the_environment_variable_is_read_in_the_registry(scratch, monkeypatch):
    q, k, x, *rest = scan_args()
    registry.register_backend("mamba3", "mine", {"scan": doubled}, fallback="reference")
    monkeypatch.setenv("HYBRIDLM_BACKEND", "mine")
    assert torch.equal(dispatch.mamba3_scan(q, k, x, *rest), 2 * x)
    assert not torch.equal(dispatch.mamba3_scan(q, k, x, *rest, backend="reference"), 2 * x)  # the argument wins
    monkeypatch.setenv("HYBRIDLM_BACKEND", "mien")
    with pytest.raises(BackendUnavailable, match="unknown mamba3 backend 'mien' .*HYBRIDLM_BACKEND"):
        dispatch.mamba3_scan(q, k, x, *rest)


def test_the_choice_stays_out_of_the_compiled_graph(scratch):
    """Loading a backend is a side effect (here: a list append), and so is a fallback warning; traced
    inside an activation checkpoint, either would break the graph (fullgraph: an error). The choice
    runs once while tracing, outside the graph."""
    from torch.utils.checkpoint import checkpoint

    loads = []

    def load():
        loads.append(1)
        return {"scan": Op(doubled, lambda device, q, x, angle: "float64" if x[1] == torch.float64 else None)}

    registry.register_backend("mamba3", "lazy", load=load, fallback="reference")
    q, k, x, *rest = scan_args()

    def block(*a):
        return checkpoint(lambda *t: dispatch.mamba3_scan(*t, backend="lazy"), *a, use_reentrant=False)

    compiled = torch.compile(block, backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, k, x, *rest), 2 * x)
    assert torch.equal(compiled(q, k, x, *rest), 2 * x)
    assert loads == [1]
    with pytest.warns(UserWarning, match="float64"):
        compiled(*(t.double() if t is not None else None for t in (q, k, x, *rest)))
