"""Register your own block kind and train a model that uses it, with no edit of hybridlm.

    python examples/custom_block.py [--tiny]

The new kind `gconv` is a gated depthwise causal convolution. Once registered, specs (YAML or
Python) may use it next to mamba3, attention and swiglu; the builder, the init recipe and the
accounting handle it. The model then trains on multi-query associative recall (MQAR) from the
evaluation harness's task generators with a plain PyTorch loop.
"""
import argparse
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import hybridlm
from hybridlm.eval.tasks import collate, make_task


class GatedConvSpec(hybridlm.BlockSpec):
    kind: Literal["gconv"] = "gconv"
    kernel: int = 4


class GatedConv(nn.Module):
    """y = out(silu(gate(x)) * causal_depthwise_conv(value(x)))."""

    def __init__(self, spec: GatedConvSpec, d_model: int, device=None, dtype=None, **unused):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.kernel = spec.kernel
        self.gate = nn.Linear(d_model, d_model, bias=False, **factory)
        self.value = nn.Linear(d_model, d_model, bias=False, **factory)
        self.conv = nn.Conv1d(d_model, d_model, spec.kernel, groups=d_model, **factory)
        self.out = nn.Linear(d_model, d_model, bias=False, **factory)

    def reset_parameters(self) -> None:  # the builder calls it for non-Linear parameters
        self.conv.reset_parameters()

    def forward(self, x, cu_seqlens=None, cache=None):
        if cu_seqlens is not None:
            raise NotImplementedError("this example block does not take packed sequences")
        v = F.pad(self.value(x).transpose(1, 2), (self.kernel - 1, 0))  # causal: left padding only
        return self.out(F.silu(self.gate(x)) * self.conv(v).transpose(1, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a few steps (what CI runs)")
    args = parser.parse_args()
    hybridlm.register_block("gconv", GatedConvSpec, GatedConv, out_projections=("out",), replace=True)
    spec = hybridlm.ModelSpec(name="gconv-hybrid", vocab_size=256, d_model=64,
                              blocks={"C": GatedConvSpec(kernel=4), "A": hybridlm.AttentionSpec(n_heads=4),
                                      "F": hybridlm.SwiGLUSpec()},
                              pattern="C F A F C F")
    print(hybridlm.format_account(hybridlm.account(spec, seq_len=128), per_block=True))
    model = hybridlm.build_model(spec, seed=0)
    task = make_task("mqar:pairs=4:queries=8", hybridlm.ByteTokenizer())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = 3 if args.tiny else 300
    for step in range(steps):
        batch = collate(task.examples(length=64, n=16, seed=step))
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
