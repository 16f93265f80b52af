"""The block-kind protocol (hybridlm/builder/model/registry.py): every spec field reaches its module,
one set of validity rules per kind, and a user kind that brings its own FLOPs, state bytes, no-decay
names and tensor-parallel plan trains through torchtitan on CPU, TP=2 included.

This file doubles as the torchtitan launcher of the toy kind (``python tests/test_block_kinds.py
<torchtitan flags>``): the kind must be registered in every rank's process.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import hybridlm
from hybridlm.blocks import Mamba3
from hybridlm.builder.model.registry import _KINDS, block_kind
from hybridlm.layouts.blocks import AttentionSpec, BlockSpec, Mamba3Spec, SwiGLUSpec, block_fields
from hybridlm.layouts.registry import unregister_block_spec

ROOT = Path(__file__).resolve().parents[1]


# -- every spec field reaches the module's constructor ----------------------------------------------
# Non-default values where a field has one that builds at d_model 64.
EXAMPLES = {
    "mamba3": Mamba3Spec(d_state=16, expand=1, headdim=16, ngroups=2, rope_fraction=1.0, mimo_rank=2,
                         a_activation="softplus", discretization="half", rotation=True, bc_bias=False,
                         conv_kernel=4, out_norm="postgate_grouped", chunk_size=8, dt_min=0.01, dt_max=0.2,
                         dt_init_floor=1e-3, A_floor=1e-3),
    "attention": AttentionSpec(n_heads=4, n_kv_heads=2, head_dim=8, position="nope", rope_theta=500.0,
                               qk_norm=True, window=7),
    "swiglu": SwiGLUSpec(hidden=96),
}
DERIVED = {"backend", "hidden"}  # passed under the same name, resolved ("auto" -> None, None -> the default)


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_every_spec_field_reaches_the_module_constructor(kind, monkeypatch):
    entry, spec = block_kind(kind), EXAMPLES[kind]
    assert type(spec) is entry.spec_cls
    module_cls = type(entry.build(spec, d_model=64, layer_idx=0, device="meta"))
    params = inspect.signature(module_cls.__init__).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), "a **kwargs hides misspellings"
    assert block_fields(entry.spec_cls) <= set(params)

    seen = {}
    original = module_cls.__init__

    def record(self, *args, **kwargs):
        seen.update(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(module_cls, "__init__", record)
    entry.build(spec, d_model=64, layer_idx=0, device="meta")
    assert block_fields(entry.spec_cls) <= set(seen)
    wrong = {f: (seen[f], getattr(spec, f)) for f in block_fields(entry.spec_cls) - DERIVED
             if seen[f] != getattr(spec, f)}
    assert not wrong


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_a_new_spec_field_cannot_be_dropped_silently(kind):
    entry = block_kind(kind)
    extended = type(f"Extended{entry.spec_cls.__name__}", (entry.spec_cls,),
                    {"__annotations__": {"new_switch": bool}, "new_switch": False})
    spec = extended(**EXAMPLES[kind].model_dump())
    with pytest.raises(TypeError, match="new_switch"):
        entry.build(spec, d_model=64, layer_idx=0, device="meta")


def test_mamba3_takes_every_official_keyword_and_refuses_a_misspelt_one():
    official = dict(d_model=64, d_state=16, expand=2, headdim=16, ngroups=1, rope_fraction=0.5, dt_min=0.001,
                    dt_max=0.1, dt_init_floor=1e-4, A_floor=1e-4, is_outproj_norm=True, is_mimo=True, mimo_rank=2,
                    fuse_pregate_headwise_norm=True, chunk_size=16, dropout=0.0, layer_idx=3, n_layer=8,
                    device="meta", dtype=torch.float32)
    m = Mamba3(**official)
    assert (m.out_norm, m.mimo_rank, m.layer_idx) == ("pregate_grouped", 2, 3)
    with pytest.raises(TypeError, match="d_stat"):
        Mamba3(d_model=64, d_stat=16)


# -- one set of rules: the spec reports what the module raises --------------------------------------
@pytest.mark.parametrize("kind,config,field", [
    ("mamba3", dict(d_state=16, headdim=48), "headdim"),
    ("mamba3", dict(d_state=16, headdim=16, ngroups=3), "ngroups"),
    ("mamba3", dict(d_state=2, headdim=16), "d_state"),
    ("mamba3", dict(d_state=16, headdim=16, dt_min=0.5), "dt_min"),
    ("attention", dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    ("attention", dict(n_heads=5), "n_heads"),
    ("attention", dict(n_heads=4, head_dim=7), "head_dim"),
])
def test_module_raises_what_the_spec_reports(kind, config, field):
    spec = block_kind(kind).spec_cls(**config)
    assert [f for f, _ in spec.problems(64)] == [field]
    with pytest.raises(ValueError, match=rf"\b{field}="):
        block_kind(kind).build(spec, d_model=64, layer_idx=0, device="meta")


# -- a user kind through the protocol ---------------------------------------------------------------
class ToySpec(BlockSpec):
    kind: Literal["toy"] = "toy"
    hidden: int = Field(64, ge=1)


class Toy(nn.Module):
    """down(silu(up(x) * gate[:, 0] + gate[:, 1]) * mix): a per-unit 2-D table (no decay, split with
    the units) and a replicated scalar."""

    def __init__(self, d_model: int, hidden: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden = hidden
        self.up = nn.Linear(d_model, hidden, bias=False, **factory)
        self.gate = nn.Parameter(torch.empty(hidden, 2, **factory))
        self.mix = nn.Parameter(torch.empty(1, **factory))
        self.down = nn.Linear(hidden, d_model, bias=False, **factory)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.up.reset_parameters()
        self.down.reset_parameters()
        self.gate[:, 0].uniform_(0.5, 1.5)
        self.gate[:, 1].uniform_(-0.1, 0.1)
        self.mix.fill_(1.0)

    def forward(self, x, cu_seqlens=None, cache=None):
        h = self.up(x) * self.gate[:, 0] + self.gate[:, 1]
        return self.down(F.silu(h) * self.mix)


def register_toy() -> None:
    from hybridlm.titan.tensor_parallel import HeadParallelPlan

    hybridlm.register_block(
        "toy", ToySpec, lambda spec, d_model, layer_idx, **ctx: Toy(d_model, spec.hidden, ctx.get("device"),
                                                                     ctx.get("dtype")),
        out_projections=("down",), flops=lambda m, seq_len: 5 * m.hidden, no_decay=("gate",),
        tp_plan=HeadParallelPlan(colwise=("up",), rowwise=("down",), sharded=("gate",)), replace=True)


@pytest.fixture
def toy_kind():
    register_toy()
    try:
        yield
    finally:
        unregister_block_spec("toy")
        _KINDS.pop("toy", None)


TOY_SPEC = """\
name: toy-hybrid
vocab_size: 256
d_model: 32
blocks:
  T: {kind: toy, hidden: 64}
  M: {kind: mamba3, d_state: 16, headdim: 16}
  F: {kind: swiglu, hidden: 64}
pattern: "T M F"
"""


def test_accounting_and_optimizer_read_the_kind(toy_kind):
    from hybridlm.builder.model.accounting import account
    from hybridlm.titan.optim import param_groups

    spec = hybridlm.layouts.spec_from_yaml(TOY_SPEC)
    acc = account(spec, seq_len=128)
    toy = acc.blocks[0]
    assert toy.kind == "toy" and toy.state_bytes == 0
    assert toy.fwd_flops_per_token == 2 * (32 * 64 * 2) + 5 * 64  # the matmuls + the kind's own FLOPs
    model = hybridlm.build_model(spec, seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "layers.0.mixer.gate" in {names[id(p)] for p in no_decay["params"]}
    assert {"layers.0.mixer.up.weight", "layers.0.mixer.down.weight"} <= {names[id(p)] for p in decay["params"]}


def test_toy_kind_has_shape_rules_for_tensor_parallelism(toy_kind):
    from hybridlm.titan.tensor_parallel import tensor_parallel_problems

    spec = hybridlm.layouts.spec_from_yaml(TOY_SPEC.replace("hidden: 64}\n  M", "hidden: 66}\n  M"))
    problems = tensor_parallel_problems(hybridlm.build_model(spec, device="meta"), 4)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "up.weight has 66 rows, not a multiple of tp=4", "down.weight has 66 columns, not a multiple of tp=4",
        "gate has 66 rows, not a multiple of tp=4"]
    assert all(p.startswith("layer 0 (blocks.T, kind 'toy')") for p in problems)


def _train(dump: Path, spec: Path, nproc: int, *flags: str) -> dict[int, float]:
    from hybridlm.titan.progress import STEP_LINE, parse_step_line

    launch = [__file__] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                             f"--nproc_per_node={nproc}", __file__]
    cmd = [sys.executable, *launch, "--job.config_file", "specs/train/cpu-debug.toml", "--hybrid.spec", str(spec),
           "--hybrid.data", "task:mqar:pairs=4", "--training.seq_len", "32", "--training.local_batch_size", "4",
           "--training.steps", "2", "--lr_scheduler.warmup_steps", "1", "--checkpoint.no-enable",
           "--metrics.no-enable-tensorboard", "--job.dump_folder", str(dump), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {step: loss for step, loss, _ in map(parse_step_line, STEP_LINE.finditer(proc.stdout))}


def test_toy_kind_trains_through_torchtitan_with_tensor_parallelism(tmp_path):
    pytest.importorskip("torchtitan")
    spec = tmp_path / "toy.yaml"
    spec.write_text(TOY_SPEC)
    one = _train(tmp_path / "one", spec, 1)
    tp = _train(tmp_path / "tp", spec, 2, "--parallelism.tensor_parallel_degree", "2")
    assert sorted(one) == sorted(tp) == [1, 2]
    for step in (1, 2):
        assert tp[step] == pytest.approx(one[step], rel=1e-4)


if __name__ == "__main__":  # a torchtitan rank with the toy kind registered
    register_toy()
    from hybridlm.titan.launch import main

    sys.exit(main())
