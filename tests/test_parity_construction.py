"""A one-layer Mamba-3 mixer can compute parity at length 256; a real-valued one only counts.

docs/results.md §1 reports that no training recipe in this project's budget got a 1-layer model
off chance on parity. These hand-set weights show that the block itself is not the limit: with
them, the data-dependent rotation turns each '1' into a half-turn, so the read-out at '=' is
sum_j (-1)^(ones after j) over the ones, which is 1 for an odd count and 0 for an even one.
"""
from __future__ import annotations

import math

import pytest
import torch

from hybridlm.blocks.mamba3 import Mamba3

ZERO, ONE, EQUALS = 0, 1, 2  # input feature of each token: one-hot directions of u
BIG = 30.0  # drives a projection into saturation: softplus -> 0, sigmoid / tanh -> 1


def parity_mixer(discretization: str, rotation: bool = True) -> Mamba3:
    """Weights by hand. Head 0, channel 0 carries the answer; everything else stays zero."""
    mixer = Mamba3(d_model=8, d_state=8, expand=1, headdim=4, discretization=discretization,
                   rotation=rotation, backend="reference", dtype=torch.float64)
    offsets = [0]
    for size in mixer.split_sizes:
        offsets.append(offsets[-1] + size)
    z_row, x_row, dt_row, a_row = offsets[0], offsets[1], offsets[4], offsets[5]
    heads = mixer.nheads
    with torch.no_grad():
        for p in mixer.parameters():
            p.zero_()
        w = mixer.in_proj.weight
        mixer.dt_bias.fill_(math.log(math.e - 1))      # Δ = softplus(0 + bias) = 1 on a '1'
        w[dt_row:dt_row + heads, ZERO] = -BIG          # Δ ≈ 0 on '0' and '=': no decay, no turn
        w[dt_row:dt_row + heads, EQUALS] = -BIG
        w[a_row:a_row + heads, :3] = -1e4              # A at its floor: the state never fades
        if discretization == "trapezoid":
            trap_row = offsets[6]
            w[trap_row:trap_row + heads, :3] = BIG     # λ = 1: no left-endpoint term
        if rotation:
            w[offsets[-2], ONE] = BIG                  # first angle pair: ω = π·tanh(·) = π on a '1'
        w[x_row, ONE] = 1.0                            # x = 1 on a '1', else 0
        mixer.B_bias[0, 0, 0] = 1.0                    # B = C = (1, 0) in the first rotated pair
        mixer.C_bias[0, 0, 0] = 1.0
        mixer.B_norm.weight.fill_(1.0)
        mixer.C_norm.weight.fill_(1.0)
        w[z_row, EQUALS] = 1.0                         # gate open at '='
        mixer.out_proj.weight[0, 0] = 1.0
    return mixer


def readout(mixer: Mamba3, bits: torch.Tensor) -> torch.Tensor:
    """Output channel 0 at the '=' after each row of bits, in units of one lone '1'."""
    tokens = torch.cat([bits, torch.full((bits.shape[0], 1), EQUALS)], dim=1)
    u = torch.nn.functional.one_hot(tokens, 8).double()
    lone = torch.nn.functional.one_hot(torch.tensor([[ONE, EQUALS]]), 8).double()
    with torch.no_grad():
        return mixer(u)[:, -1, 0] / mixer(lone)[0, -1, 0]


@pytest.mark.parametrize("discretization", ["trapezoid", "euler"])
def test_rotation_computes_parity_at_length_256(discretization):
    bits = torch.randint(0, 2, (64, 256), generator=torch.Generator().manual_seed(0))
    got = readout(parity_mixer(discretization), bits)
    want = (bits.sum(1) % 2).double()
    # The floor A = 1e-4 decays each '1' by e^-1e-4: at most 1.3 % over 128 ones.
    assert (got - want).abs().max() < 0.02


def test_without_rotation_the_same_weights_only_count():
    bits = torch.randint(0, 2, (64, 256), generator=torch.Generator().manual_seed(1))
    got = readout(parity_mixer("trapezoid", rotation=False), bits)
    count = bits.sum(1).double()
    assert ((got - count).abs() / count).max() < 0.02


def test_parity_probe_batches_and_recipe_errors():
    from hybridlm.studies import parity_probe

    ids, answer = parity_probe.parity_batch(32, 9, torch.Generator().manual_seed(0), "cpu")
    bits = ids[:, :-1] - parity_probe.ZERO
    assert set(bits.unique().tolist()) <= {0, 1} and (ids[:, -1] == parity_probe.EQUALS).all()
    assert torch.equal(answer - parity_probe.ZERO, bits.sum(1) % 2)
    with pytest.raises(SystemExit):
        parity_probe.main(["--recipes", "base,no-such-recipe", "--out", "/tmp/parity-probe-test"])
