"""The Triton scan under torch.compile: its kernels are ``torch.library`` custom ops, so dynamo
treats them as opaque calls (fake-tensor shapes) instead of tracing into Triton's launcher.

Runs on the CPU under TRITON_INTERPRET=1 (conftest), so shapes are tiny and the compile backend is
aot_eager (dynamo + AOTAutograd, no codegen): what it checks is that the graph has no break and
that the ops' schemas, fake impls and autograd registrations are right. Inductor's own codegen
around the ops on CUDA is not exercised here.
"""
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybridlm.kernels.mamba3 import oracle
from hybridlm.kernels.mamba3.contract import Mamba3State
from hybridlm.testing import rel_err, scan_kwargs
from test_reference import _angles, make_inputs, random_state
from test_triton_scan import CONFIGS, DEVICE, FWD_TOL, GRAD_TOL, assert_same, run_with_grads, to_device

triton_kernels = pytest.importorskip("hybridlm.kernels.mamba3.triton")
OPS = ("mamba3_chunk_fwd", "mamba3_chunk_bwd", "token_walk_fwd", "token_walk_bwd", "gated_output_fwd",
       "gated_output_bwd", "expand_ranks_fwd", "expand_ranks_bwd")


class RecordOps(TorchDispatchMode):
    """Records the arguments of every hybridlm custom op call (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "hybridlm":
            self.calls.setdefault(func._opname, []).append((args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mimo_inputs(L=12):
    """MIMO rank 2, two groups, grouped norm, rotation, biases, D, gate: every op input present.
    Two heads keep the interpreted kernels quick."""
    R, G, H, N, P, frac, layout, out_norm = CONFIGS["mimo2-groups"]
    H, S = 2, _angles(N, frac)
    args, kw = make_inputs(B=2, L=L, R=R, G=G, H=H, N=N, P=P, S=S, layout=layout, out_norm=out_norm)
    return args, kw, random_state(2, H, P, N, S, R)


def test_scan_forward_and_backward_go_through_the_custom_ops_and_match_reference():
    """Packed ragged sequences with initial states: every op runs once each way, and the output,
    final state and every input gradient equal the reference's."""
    R, G, H, N, P, frac, layout, out_norm = CONFIGS["mimo2-groups"]
    S = _angles(N, frac)
    lengths = [7, 0, 12, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    args, kw = make_inputs(B=1, L=sum(lengths), R=R, G=G, H=H, N=N, P=P, S=S, layout=layout, out_norm=out_norm)
    init = random_state(len(lengths), H, P, N, S, R)
    with RecordOps() as rec:
        ours = run_with_grads(triton_kernels.mamba3_chunked, args, kw, init, cu_seqlens=cu, chunk_size=8)
    assert {name: len(calls) for name, calls in rec.calls.items()} == {name: 1 for name in OPS}
    assert_same(ours, run_with_grads(oracle.mamba3_chunked, args, kw, init, cu_seqlens=cu, chunk_size=8))


@functools.cache
def recorded_op_args() -> dict[str, tuple]:
    """Real arguments of every op, from one forward+backward of the scan (two chunks a sequence)."""
    args, kw, init = mimo_inputs(L=9)
    with RecordOps() as rec:
        run_with_grads(triton_kernels.mamba3_chunked, args, kw, init, chunk_size=8)
    return {name: calls[0] for name, calls in rec.calls.items()}


@pytest.mark.parametrize("name", OPS)
def test_opcheck_schema_fake_and_autograd_registration(name):
    op_args, op_kwargs = recorded_op_args()[name]
    op_args = [a.detach().clone() if torch.is_tensor(a) else a for a in op_args]
    if name.endswith("_fwd"):  # differentiable inputs require grad, so the autograd registration is checked
        op_args = [a.clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
                   for a in op_args]
    torch.library.opcheck(getattr(torch.ops.hybridlm, name).default, op_args, op_kwargs)


def test_sac_save_list_names_the_forward_ops():
    assert {op.name() for op in triton_kernels.SAC_SAVE_OPS} == {f"hybridlm::{n}" for n in OPS if n.endswith("_fwd")}


def aot_eager_recording(seen: set):
    """The aot_eager backend, also noting every op dynamo put in the graph (the scan must be there
    as a custom op, not silently replaced by a fallback)."""
    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def outputs_and_grads(fn, args, kw, init):
    """Output, final state and the gradients of a fixed random projection w.r.t. every tensor input."""
    leaves = [None if t is None else to_device(t).clone().requires_grad_() for t in args]
    kwl = {n: to_device(v).clone().requires_grad_() if torch.is_tensor(v) else v for n, v in kw.items()}
    state = Mamba3State(*(to_device(t).clone().requires_grad_() for t in init))
    y, final = fn(*leaves, state, kwl)
    gen = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum() for t in (y, *final))
    inputs = [t for t in leaves if t is not None] + [v for v in kwl.values() if torch.is_tensor(v)] + list(state)
    return [y, *final], torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("fuse_ranks", [0, 1])
def test_fullgraph_compile_of_the_scan_matches_eager(fuse_ranks):
    """fullgraph=True raises on any graph break, so compiling at all proves dynamo saw the ops as
    opaque; then outputs and gradients must equal eager's. With the rank expansion fused
    (``triton_fuse_ranks``, read once while tracing), the graph has no expansion op."""
    from hybridlm.kernels.mamba3.tuning import use_tuning

    torch._dynamo.reset()  # the knob is a constant of the traced graph: trace again
    args, kw, init = mimo_inputs()

    def scan(*a):
        *inputs, state, kwargs = a
        return triton_kernels.mamba3_chunked(*inputs, **scan_kwargs(kwargs), initial_state=state, chunk_size=8,
                                             return_final_state=True)

    seen = set()
    compiled = torch.compile(scan, backend=aot_eager_recording(seen), fullgraph=True)
    with use_tuning(triton_fuse_ranks=fuse_ranks):
        out, grads = outputs_and_grads(compiled, args, kw, init)
        out_ref, grads_ref = outputs_and_grads(scan, args, kw, init)
    torch._dynamo.reset()
    assert "hybridlm.mamba3_chunk_fwd.default" in seen, seen
    assert ("hybridlm.expand_ranks_fwd.default" in seen) == (not fuse_ranks), seen
    assert max(rel_err(a, b) for a, b in zip(out, out_ref)) <= FWD_TOL
    assert max(rel_err(a, b) for a, b in zip(grads, grads_ref)) <= GRAD_TOL


def test_fullgraph_compile_of_a_mamba3_block_on_triton_matches_eager():
    from hybridlm.blocks import Mamba3
    from hybridlm.testing import randomize_mamba3_

    block = Mamba3(d_model=32, d_state=16, headdim=16, ngroups=2, is_mimo=True, mimo_rank=2, chunk_size=8,
                   out_norm="pregate_grouped", backend="triton", device=DEVICE)
    randomize_mamba3_(block, seed=3)
    u = torch.randn(2, 11, 32, device=DEVICE)  # two chunks, the second partial

    def run(module):
        block.zero_grad()
        out = module(u)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in block.named_parameters()}

    seen = set()
    out, grads = run(torch.compile(block, backend=aot_eager_recording(seen), fullgraph=True))
    assert "hybridlm.mamba3_chunk_fwd.default" in seen, seen
    out_ref, grads_ref = run(block)
    assert rel_err(out, out_ref) <= FWD_TOL
    bad = {n: rel_err(g, grads_ref[n]) for n, g in grads.items() if rel_err(g, grads_ref[n]) > GRAD_TOL}
    assert not bad, bad
