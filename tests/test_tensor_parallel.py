"""Tensor parallelism (hybridlm/titan/tensor_parallel.py) on gloo processes against the unsharded
model (TP=1) built from the same seed — logits, every gradient, an optimizer step, the state_dict
layout and DCP checkpoints — plus the clear errors for configurations it cannot shard.

TP=2 runs on two processes; a second run of four processes covers TP=4 (B/C groups read by rank
pairs) and FSDP2 x TP (2 x 2). Each run starts once per module (this file doubles as the worker
script) and writes its measurements as JSON for the tests to assert on (a rank that raises fails
the run, and its output is shown).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hybridlm
from hybridlm.blocks import Mamba3
from hybridlm.testing import randomize_mamba3_, rel_err

TOL = 1e-5  # fp32; only the order of the reductions differs between TP=1 and TP=2
BATCH, SEQ = 2, 16

SPECS = {
    # Mamba-3 SISO (pre-gate grouped norm) + GQA attention with RoPE and QK-norm + SwiGLU, tied head.
    "hybrid": dict(
        blocks={"M": {"kind": "mamba3", "d_state": 16, "headdim": 16, "out_norm": "pregate_grouped"},
                "A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
                "F": {"kind": "swiglu", "hidden": 128}},
        pattern="M F A F"),
    # MIMO rank 2 with 2 B/C groups (group-sharded, rank-major B/C rows), post-gate grouped norm,
    # no trapezoid segment; untied head.
    "mimo": dict(
        blocks={"M": {"kind": "mamba3", "d_state": 16, "headdim": 16, "mimo_rank": 2, "ngroups": 2,
                      "discretization": "half", "out_norm": "postgate_grouped"},
                "F": {"kind": "swiglu", "hidden": 128}},
        pattern="M F", tie_embeddings=False),
    # SISO with 4 groups over 8 heads, Euler (no trap segment), no rotation (no angle segment),
    # no B/C biases, no out-norm.
    "groups": dict(
        blocks={"M": {"kind": "mamba3", "d_state": 16, "headdim": 16, "ngroups": 4, "discretization": "euler",
                      "rotation": False, "bc_bias": False, "out_norm": "none"}},
        pattern="M M"),
    # 2 groups over 8 heads: at TP=4 each group is read by two ranks (B/C replicated, sliced per rank).
    "groups2": dict(
        blocks={"M": {"kind": "mamba3", "d_state": 16, "headdim": 16, "ngroups": 2, "out_norm": "pregate_grouped"},
                "F": {"kind": "swiglu", "hidden": 128}},
        pattern="M F"),
}
# name: (spec, sequence_parallel, loss_parallel, world size, mesh: "tp" = 1-D TP, "dp,tp" = FSDP2 x TP,
#        compiled layers: torch.compile(aot_eager, fullgraph) as hybridlm.titan.parallelize does per block)
SCENARIOS = {
    "hybrid": ("hybrid", True, False, 2, "tp", ()),
    "hybrid_no_sp_loss_parallel": ("hybrid", False, True, 2, "tp", ()),
    "mimo": ("mimo", True, False, 2, "tp", ()),
    "groups": ("groups", True, False, 2, "tp", ()),
    # the first block right after the (eager) embedding is the case that once broke backward
    "groups_first_block_compiled": ("groups", True, False, 2, "tp", (0,)),
    "groups_shared_by_rank_pairs_tp4": ("groups2", True, False, 4, "tp", ()),
    "hybrid_fsdp2_x_tp2": ("hybrid", True, False, 4, "dp,tp", ()),
}
WORLDS = (2, 4)


def make_spec(name: str) -> hybridlm.ModelSpec:
    return hybridlm.ModelSpec(name=name, vocab_size=256, d_model=64, **SPECS[name])


@torch.no_grad()
def build_reference(name: str, seed: int = 0) -> torch.nn.Module:
    """The unsharded model with every constant-at-init parameter randomized (ones would hide layout bugs)."""
    model = hybridlm.build_model(make_spec(name), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, Mamba3):
            randomize_mamba3_(module, seed=seed)
    for pname, p in model.named_parameters():
        if "norm" in pname:
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# the worker (runs in each of the two processes)
# ---------------------------------------------------------------------------------------------
def _unwrapped(name: str) -> str:
    """The parameter name without torch.compile's wrapper (get_model_state_dict drops it too)."""
    return name.replace("._orig_mod", "")


def _official_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a full tensor under its official (unsharded) name."""
    from hybridlm.titan.tensor_parallel import HeadShardedInProj

    grads, seen = {}, set()
    for mname, module in model.named_modules():
        prefix = _unwrapped(f"{mname}.") if mname else ""
        if isinstance(module, HeadShardedInProj):
            d = module.official_shape[1]
            grads[prefix + "weight"] = torch.cat([getattr(module, s.name).grad.full_tensor().reshape(-1, d)
                                                  for s in module.segments])
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.grad is not None and id(p) not in seen:  # a tied head is the embedding's parameter
                seen.add(id(p))
                grads[prefix + pname] = p.grad.full_tensor()
    return grads


def _official_weights(model) -> dict[str, torch.Tensor]:
    from hybridlm.titan.tensor_parallel import HeadShardedInProj

    out, seen = {}, set()
    for mname, module in model.named_modules():
        prefix = _unwrapped(f"{mname}.") if mname else ""
        if isinstance(module, HeadShardedInProj):
            out[prefix + "weight"] = module.full_weight()
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[prefix + pname] = p.full_tensor()
    return out


def _loss(logits, targets, loss_parallel: bool):
    from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_ctx

    if loss_parallel:
        with loss_parallel_ctx():
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
        return loss
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return loss


def _mesh(world: int, layout: str):
    from torch.distributed.device_mesh import init_device_mesh

    if layout == "tp":
        return init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))


def _parallelize(model, mesh, **tp_kwargs):
    """TP, then (on a 2-D mesh) FSDP2 per block and at the root, as hybridlm.titan.parallelize does."""
    from torch.distributed.fsdp import fully_shard

    from hybridlm.titan.tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(model, mesh["tp"], **tp_kwargs)
    if "dp" in mesh.mesh_dim_names:
        for block in model.layers:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def _compare_scenario(name: str, mesh) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    spec_name, sequence_parallel, loss_parallel, _, _, compiled = SCENARIOS[name]
    ref = build_reference(spec_name)
    # Every rank sees the same batch, so FSDP's gradient average over dp equals the TP=1 gradient.
    tp_model = _parallelize(copy.deepcopy(ref), mesh, loss_parallel=loss_parallel,
                            sequence_parallel=sequence_parallel)
    for i in compiled:
        tp_model.layers[i] = torch.compile(tp_model.layers[i], backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, 256, (BATCH, SEQ), generator=gen)

    ref_logits = ref(ids)
    ref_loss = _loss(ref_logits, targets, False)
    logits = tp_model(ids)
    loss = _loss(logits, targets, loss_parallel)
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    if isinstance(loss, DTensor):
        loss = loss.full_tensor()

    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    grads = _official_grads(tp_model)
    result = {
        "logits": rel_err(logits, ref_logits),
        "loss": abs(loss.item() - ref_loss.item()),
        "grads": {n: rel_err(grads[n], g) for n, g in ref_grads.items() if n in grads},
        "grads_missing": sorted(set(ref_grads) - set(grads)),
        "grads_extra": sorted(set(grads) - set(ref_grads)),
        "state_dict": {_unwrapped(k): list(v.shape) for k, v in tp_model.state_dict().items()},
        "dsd_state_dict": {k: list(v.shape) for k, v in get_model_state_dict(tp_model).items()},
        "ref_state_dict": {k: list(v.shape) for k, v in ref.state_dict().items()},
    }

    # One SGD step on both: replicated parameters carry partial gradients that the step must sum.
    for model in (ref, tp_model):
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    weights = _official_weights(tp_model)
    result["after_step"] = {n: rel_err(weights[n], p) for n, p in ref.named_parameters() if n in weights}
    return result


def _checkpoint_scenario(mesh, out_dir: Path) -> dict:
    """DCP through the official layout: save a sharded model from a state dict taken *before* its
    weights changed (torchtitan caches it), read it unsharded; load it back, and from TP=1."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    rank = torch.distributed.get_rank()
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    ref = build_reference("mimo", seed=3)
    tp_model = _parallelize(copy.deepcopy(ref), mesh)
    cached = get_model_state_dict(tp_model)
    with torch.no_grad():  # change every weight in place after the state dict was taken
        for model in (ref, tp_model):
            for p in model.parameters():
                p.mul_(1.25).add_(0.01)
    dcp.save(cached, checkpoint_id=str(out_dir / "ckpt_sharded"))
    dcp.save(ref.state_dict(), checkpoint_id=str(out_dir / "ckpt_tp1"))
    if rank == 0:
        torch.save(ref.state_dict(), out_dir / "ref_state.pt")
    ref_logits = ref(ids)

    result = {}
    for source in ("ckpt_sharded", "ckpt_tp1"):
        fresh = _parallelize(build_reference("mimo", seed=4), mesh)
        state = get_model_state_dict(fresh)
        dcp.load(state, checkpoint_id=str(out_dir / source))
        set_model_state_dict(fresh, state)
        with torch.no_grad():
            result[f"logits_after_load_{source}"] = rel_err(fresh(ids), ref_logits)
    return result


def _meta_scenario(mesh) -> dict:
    """torchtitan's order: build on the meta device, shard, materialize, init_weights (must work on
    DTensors), then load unsharded weights (implicit replication: each rank keeps its part)."""
    from torch.distributed.tensor.experimental import implicit_replication

    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    result = {}
    for name in ("hybrid", "mimo"):
        ref = build_reference(name, seed=6)
        model = _parallelize(hybridlm.build_model(make_spec(name), device="meta"), mesh)
        model.to_empty(device="cpu")
        model.init_weights()
        with torch.no_grad(), implicit_replication():
            model.load_state_dict(ref.state_dict())
            result[name] = rel_err(model(ids), ref(ids))
    return result


def _error_scenario(mesh) -> dict:
    """apply_tensor_parallel on a model it cannot shard: the error, and the model left untouched."""
    from torch.distributed.tensor import DTensor

    from hybridlm.titan.tensor_parallel import TensorParallelError, apply_tensor_parallel

    spec = hybridlm.ModelSpec(name="bad", vocab_size=256, d_model=64, pattern="F A",
                              blocks={"A": {"kind": "attention", "n_heads": 3, "n_kv_heads": 1, "head_dim": 16},
                                      "F": {"kind": "swiglu", "hidden": 128}})
    model = hybridlm.build_model(spec, seed=0)
    try:
        apply_tensor_parallel(model, mesh)
        message = None
    except TensorParallelError as err:
        message = str(err)
    untouched = not any(isinstance(p, DTensor) for p in model.parameters())
    sharded = apply_tensor_parallel(build_reference("groups"), mesh)
    try:
        apply_tensor_parallel(sharded, mesh)
        twice = None
    except TensorParallelError as err:
        twice = str(err)
    return {"message": message, "untouched": untouched, "twice": twice}


def _worker(rank: int, world: int, out_dir: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=world)
    results = {}
    for name, (*_, scenario_world, layout, _) in SCENARIOS.items():
        if scenario_world == world:
            results[name] = _compare_scenario(name, _mesh(world, layout))
    results["checkpoint"] = _checkpoint_scenario(_mesh(world, "tp" if world == 2 else "dp,tp"), out_dir)
    results["meta"] = _meta_scenario(_mesh(world, "tp" if world == 2 else "dp,tp"))
    if world == 2:
        results["error"] = _error_scenario(_mesh(world, "tp")["tp"])
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the tests (parent process)
# ---------------------------------------------------------------------------------------------
def _launch(world: int, out_dir: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(world), str(out_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    start, outputs = time.time(), []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1, 240 - (time.time() - start)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the {world}-rank tensor-parallel run timed out")
    if any(p.returncode for p in procs):
        pytest.fail(f"a rank of the {world}-rank tensor-parallel run failed:\n" + "\n".join(o[-4000:] for o in outputs))
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> (the ranks' results, the run's folder); each world runs once, when first needed."""
    done = {}

    def get(world: int):
        if world not in done:
            out_dir = tmp_path_factory.mktemp(f"tp_world{world}")
            done[world] = (_launch(world, out_dir), out_dir)
        return done[world]
    return get


def _ranks(runs, scenario: str) -> list[dict]:
    return [rank[scenario] for rank in runs(SCENARIOS[scenario][3])[0]]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_logits_and_loss_match_tp1(runs, scenario):
    for res in _ranks(runs, scenario):
        assert res["logits"] <= TOL
        assert res["loss"] <= TOL


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_gradient_of_every_parameter_matches_tp1(runs, scenario):
    for res in _ranks(runs, scenario):
        assert res["grads_missing"] == [] and res["grads_extra"] == []
        bad = {n: e for n, e in res["grads"].items() if not e <= TOL}
        assert not bad, f"gradients differ: {bad}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_optimizer_step_matches_tp1(runs, scenario):
    # Partial gradients of replicated parameters (B/C norms, angle rows, ...) must be summed by the step.
    for res in _ranks(runs, scenario):
        bad = {n: e for n, e in res["after_step"].items() if not e <= TOL}
        assert not bad, f"weights differ after one step: {bad}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_state_dict_keeps_official_names_and_full_shapes(runs, scenario):
    for res in _ranks(runs, scenario):
        assert res["state_dict"] == res["ref_state_dict"]
        assert res["dsd_state_dict"] == res["ref_state_dict"]
        assert any(k.endswith("mixer.in_proj.weight") for k in res["state_dict"])


@pytest.mark.parametrize("world", WORLDS)
def test_dcp_checkpoint_of_sharded_model_is_the_official_layout_with_current_values(runs, world):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = runs(world)[1]
    dcp_to_torch_save(out / "ckpt_sharded", out / "sharded.pt")
    saved = torch.load(out / "sharded.pt")
    expected = torch.load(out / "ref_state.pt")
    assert saved.keys() == expected.keys()
    bad = {k: rel_err(saved[k], v) for k, v in expected.items() if not rel_err(saved[k], v) <= TOL}
    assert not bad, f"checkpointed weights differ from the model's current weights: {bad}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("source", ["ckpt_sharded", "ckpt_tp1"])
def test_dcp_load_into_sharded_model_reproduces_logits(runs, world, source):
    for rank in runs(world)[0]:
        assert rank["checkpoint"][f"logits_after_load_{source}"] <= TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("spec", ["hybrid", "mimo"])
def test_sharded_on_meta_then_initialized_and_loaded_from_unsharded_weights_matches(runs, world, spec):
    for rank in runs(world)[0]:
        assert rank["meta"][spec] <= TOL


def test_apply_rejects_unshardable_model_with_one_error_and_changes_nothing(runs):
    res = runs(2)[0][0]["error"]
    assert res["message"] is not None and "blocks.A.n_kv_heads = 1" in res["message"]
    assert res["untouched"]
    assert res["twice"] is not None and "already sharded" in res["twice"]


# -- validation without processes ----------------------------------------------------------------
@pytest.mark.parametrize("block,field", [
    ({"kind": "attention", "n_heads": 4, "n_kv_heads": 1}, "blocks.X.n_kv_heads = 1"),
    ({"kind": "attention", "n_heads": 3}, "blocks.X.n_kv_heads = 3"),
    ({"kind": "swiglu", "hidden": 90}, "blocks.X.hidden = 90"),
    ({"kind": "mamba3", "d_state": 16, "headdim": 64}, "blocks.X.headdim = 64"),  # 3 heads
    # 12 heads at d_model 96: 6 groups neither divide nor are a multiple of 4 ranks
    ({"kind": "mamba3", "d_state": 16, "headdim": 16, "ngroups": 6}, "blocks.X.ngroups = 6"),
    ({"kind": "mamba3", "d_state": 16, "headdim": 16, "conv_kernel": 4}, "blocks.X.conv_kernel = 4"),
    ({"kind": "mamba3", "d_state": 16, "headdim": 16, "out_norm": "pregate_default"},
     "blocks.X.out_norm = 'pregate_default'"),
])
def test_unsupported_configs_are_named(block, field):
    from hybridlm.titan.tensor_parallel import tensor_parallel_problems

    spec = hybridlm.ModelSpec(name="t", vocab_size=256, d_model=96, blocks={"X": block}, pattern="X X")
    problems = tensor_parallel_problems(hybridlm.build_model(spec, device="meta"), 4)
    assert len(problems) == 1 and problems[0].startswith(field), problems  # once, not once per layer


def test_supported_configs_have_no_problems():
    from hybridlm.titan.tensor_parallel import tensor_parallel_problems

    for name in SPECS:
        assert tensor_parallel_problems(hybridlm.build_model(make_spec(name), device="meta"), 2) == []


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
