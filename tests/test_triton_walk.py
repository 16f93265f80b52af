"""The per-token walk (γ, scale, the cumulative angle: hybridlm/kernels/mamba3/triton/angles.py)
against the torch ops it replaced, forward and every gradient, on packed sequences with an empty
one, a one-token one and initial angles. Interpreted on the CPU (TRITON_INTERPRET=1, conftest)."""
import pytest
import torch

from hybridlm.kernels.mamba3.shared import TWO_PI
from hybridlm.testing import reference_walk, rel_err

angles = pytest.importorskip("hybridlm.kernels.mamba3.triton.angles")


@pytest.mark.parametrize("S", [0, 3, 8])
def test_walk_matches_torch(S):
    lengths = [70, 0, 1, 130]  # several token blocks, an empty and a one-token sequence
    T, H = sum(lengths), 5
    g = torch.Generator().manual_seed(0)
    dt = (torch.rand(T, H, generator=g) * 0.5).requires_grad_()
    lam = torch.rand(T, H, generator=g).requires_grad_()
    rate = (3 * torch.randn(T, S, generator=g)).requires_grad_() if S else None
    theta0 = (TWO_PI * torch.rand(len(lengths), H, S, generator=g)).requires_grad_()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    ours = angles.token_walk_fwd(dt, lam, rate, theta0, cu)
    want = reference_walk(dt, lam, rate, theta0, lengths)
    assert rel_err(ours[0], want[0]) < 1e-7 and rel_err(ours[1], want[1]) < 1e-7
    # θ mod 2π: compare the rotations (cos, sin), which is what the scan reads
    assert ours[2].shape == want[2].shape
    for f in (torch.cos, torch.sin):
        assert ((f(ours[2]) - f(want[2])).abs() < 2e-5).all()
    weights = [torch.randn(t.shape, generator=g) for t in want]
    inputs = [dt, lam] + ([rate, theta0] if S else [])
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours, weights)), inputs)
    ref = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want, weights)), inputs)
    for name, a, b in zip(("dt", "lam", "rate", "theta0"), got, ref):
        assert rel_err(a, b) < 1e-6, (name, rel_err(a, b))  # measured ≤ 2e-7 (fp32 sums in another order)
