"""What the fused decode-step kernels (Triton, CuTe) write, and the torch finish for the norms they
leave out. Both kernels gate, normalize (per head) and contract the ranks themselves; the
"default" output norms take every head's values at once, so for those a kernel writes each rank's
y in fp32 and :func:`finish_step_output` applies the norm with the reference."""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels.mamba3.contract import DecodeLayout, DecodeParams
from hybridlm.kernels.mamba3.shared import mamba3_output

# out_norm -> how the kernel ends: 0 none, 1 pre-gate grouped, 2 post-gate grouped, 3 per-rank y
OUT_MODES = {"none": 0, "pregate_grouped": 1, "postgate_grouped": 2, "pregate_default": 3, "postgate_default": 3}
PER_RANK_Y = 3


def allocate_step_output(proj: Tensor, layout: DecodeLayout) -> Tensor:
    """(B, H·P) in proj's dtype, or (B, R, H·P) fp32 for the per-rank y."""
    width = layout.nheads * layout.headdim
    if OUT_MODES[layout.out_norm] == PER_RANK_Y:
        return torch.empty(proj.shape[0], layout.rank, width, device=proj.device, dtype=torch.float32)
    return torch.empty(proj.shape[0], width, device=proj.device, dtype=proj.dtype)


def finish_step_output(out: Tensor, proj: Tensor, params: DecodeParams, layout: DecodeLayout) -> Tensor:
    """The kernel's output as out_proj's input (B, H·P): as is, or the norm over all heads applied."""
    if OUT_MODES[layout.out_norm] != PER_RANK_Y:
        return out
    H, P = layout.nheads, layout.headdim
    y = out.unflatten(-1, (H, P))
    z = layout.in_proj.split(proj)["z"].unflatten(-1, (H, P)).float()
    o = mamba3_output(y, z, mimo_z=params.mimo_z, mimo_o=params.mimo_o, norm_weight=params.norm_weight,
                      out_norm=layout.out_norm, norm_eps=layout.norm_eps)
    return o.flatten(-2).to(proj.dtype)
