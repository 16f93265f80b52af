"""torchtitan training on CPU: smoke, 2-rank FSDP (gloo), kill-and-resume, export -> load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan")

ROOT = Path(__file__).resolve().parents[1]
SPEC = "specs/demo/hybrid-demo.yaml"
from hybridlm.titan.progress import STEP_LINE, parse_step_line  # noqa: E402
FAST = ["--training.seq_len", "64", "--training.local_batch_size", "4", "--lr_scheduler.warmup_steps", "2",
        "--hybrid.data", "task:mqar:pairs=4", "--hybrid.spec", SPEC]


def run_titan(dump: Path, *flags: str, nproc: int = 1, timeout: int = 300) -> dict[int, float]:
    """Train in a subprocess (torchtitan wants one process group per process); returns {step: loss}."""
    launch = ["-m", "hybridlm.titan.launch"]
    if nproc > 1:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launch]
    cmd = [sys.executable, *launch, "--job.config_file", "specs/train/cpu-debug.toml", *FAST,
           "--job.dump_folder", str(dump), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {step: loss for step, loss, _ in map(parse_step_line, STEP_LINE.finditer(proc.stdout))}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("smoke")
    losses = run_titan(dump, "--training.steps", "8", "--checkpoint.interval", "4")
    return dump, losses


def test_one_rank_smoke_trains_logs_and_checkpoints(smoke_run):
    dump, losses = smoke_run
    assert sorted(losses) == list(range(1, 9))
    assert all(v == v and v < 20 for v in losses.values())  # finite
    assert losses[8] < losses[1] - 0.5  # falling
    for step in (4, 8):
        assert (dump / "checkpoint" / f"step-{step}" / ".metadata").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((dump / "tb").iterdir())
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss_metrics/global_avg_loss", "grad_norm", "lr", "throughput(tps)"} <= tags
    record = json.loads((dump / "hybridlm_run.json").read_text())
    assert record["train_seq_len"] == 64 and record["spec"]["name"] == "hybrid-demo"


def test_export_then_load_gives_the_trained_weights(smoke_run, tmp_path):
    import hybridlm
    from hybridlm.cli.main import main
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dump, _ = smoke_run
    assert main(["export", str(dump), "--out", str(tmp_path / "model")]) == 0
    loaded = hybridlm.load(tmp_path / "model")
    assert loaded.train_seq_len == 64 and loaded.metadata["step"] == 8
    # An independent path to the same weights: torch's own DCP -> torch.save conversion.
    dcp_to_torch_save(str(dump / "checkpoint" / "step-8"), str(tmp_path / "flat.pt"))
    flat = torch.load(tmp_path / "flat.pt", weights_only=False)
    reference = hybridlm.build_model(hybridlm.load_spec(SPEC), seed=123)
    reference.load_state_dict({k: v for k, v in flat.items() if k in reference.state_dict()}, strict=False)
    reference.tie_weights()
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), reference.eval()(ids))
        fresh = hybridlm.build_model(hybridlm.load_spec(SPEC), seed=123).eval()
        assert not torch.allclose(loaded.model(ids), fresh(ids))  # trained weights, not an init


def test_two_rank_fsdp_and_kill_and_resume(tmp_path):
    """2 ranks on gloo with FSDP2; a run stopped after step 2 and restarted matches an uninterrupted one."""
    straight = run_titan(tmp_path / "a", "--training.steps", "4", "--checkpoint.interval", "2", nproc=2)
    assert sorted(straight) == [1, 2, 3, 4] and straight[4] < straight[1]
    first = run_titan(tmp_path / "b", "--training.steps", "2", "--checkpoint.interval", "2", nproc=2)
    resumed = run_titan(tmp_path / "b", "--training.steps", "4", "--checkpoint.interval", "2", nproc=2)
    assert first == {1: straight[1], 2: straight[2]}
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == pytest.approx(straight[3], rel=1e-5) and resumed[4] == pytest.approx(straight[4], rel=1e-5)


def test_optimizer_keeps_decay_off_scalars_norms_and_biases():
    import hybridlm
    from hybridlm.titan.optim import param_groups

    model = hybridlm.build_model(hybridlm.get_preset("mamba3-mimo-tiny"), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    decay_names = {names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]}
    assert {"dt_bias", "D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o"} <= no_decay_names
    assert all("norm" in names[id(p)] or names[id(p)].rsplit(".", 1)[-1] in no_decay_names for p in no_decay["params"])
    assert {"weight"} == decay_names and no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert not any("norm" in names[id(p)] for p in decay["params"])


def test_flops_follow_the_builder_accounting():
    from hybridlm.builder.model.accounting import account
    from hybridlm.layouts import load_spec
    from hybridlm.titan.args import HybridModelArgs

    spec = load_spec(SPEC)
    args = HybridModelArgs(spec=spec.to_dict(exclude_defaults=False))
    nparams, flops = args.get_nparams_and_flops(None, 256)
    acc = account(spec, seq_len=256)
    assert (nparams, flops) == (acc.total_params, acc.train_flops_per_token)
    # The attention term is torchtitan's: 12 * heads * head_dim * seq_len per attention layer.
    shorter = args.get_nparams_and_flops(None, 128)[1]
    attn_term = 12 * 4 * 32 * 128
    mamba_scan = sum(3 * (account(spec, seq_len=256).blocks[i].fwd_flops_per_token -
                          account(spec, seq_len=128).blocks[i].fwd_flops_per_token) for i in range(8))
    assert flops - shorter == mamba_scan and mamba_scan >= attn_term


def test_tensor_parallel_training_matches_one_rank(tmp_path):
    """TP=2 through torchtitan (gloo, loss parallel): same init, same losses, same exported weights."""
    import hybridlm
    from hybridlm.titan.export import export_checkpoint

    steps = ["--training.steps", "3", "--checkpoint.interval", "3"]
    one = run_titan(tmp_path / "one", *steps)
    tp = run_titan(tmp_path / "tp", *steps, "--parallelism.tensor_parallel_degree", "2", nproc=2)
    assert sorted(tp) == [1, 2, 3]
    for step in (1, 2, 3):
        assert tp[step] == pytest.approx(one[step], rel=1e-4)
    a = hybridlm.load(export_checkpoint(tmp_path / "one", tmp_path / "a")).model
    b = hybridlm.load(export_checkpoint(tmp_path / "tp", tmp_path / "b")).model
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids), rtol=1e-4, atol=1e-4)
