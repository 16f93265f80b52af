"""The restart of a paused state-tracking run with Adam's second moments kept or reset
(hybridlm/studies/state_tracking_restart.py): the moments it writes and the update sizes it reports."""
import json

import torch

from hybridlm.studies import state_tracking_restart as restart
from hybridlm.studies.state_tracking_train import Trainer
from test_state_tracking_protocol import tiny


def test_reset_makes_each_second_moment_the_next_gradients_square_and_keep_changes_nothing(tmp_path):
    settings = tiny(diagnostics_every=0)
    source = tmp_path / "run"
    assert Trainer(settings, source, "k").train(stop_after_steps=3) == "paused"
    flags = settings.to_flags()

    assert restart.main([str(source), str(tmp_path / "keep"), "--second-moments", "keep", "--run-key", "k", *flags]) == 0
    assert (tmp_path / "keep" / "checkpoint.pt").read_bytes() == (source / "checkpoint.pt").read_bytes()
    kept = json.loads((tmp_path / "keep" / "restart.json").read_text())
    assert kept["step"] == 3 and "after_reset" not in kept

    assert restart.main([str(source), str(tmp_path / "reset"), "--second-moments", "reset", "--run-key", "k",
                         *flags]) == 0
    reference = Trainer(settings, source, "k")
    reference.resume()
    grads = restart.next_gradients(reference)
    names = {p: n for n, p in reference.model.named_parameters()}
    saved = torch.load(tmp_path / "reset" / "checkpoint.pt", weights_only=False)
    restarted = Trainer(settings, tmp_path / "reset", "k")
    restarted.resume()
    by_name = dict(restarted.model.named_parameters())
    for p, g in grads.items():
        assert torch.equal(restarted.opt.state[by_name[names[p]]]["exp_avg_sq"], g * g), names[p]
    assert saved["step"] == 3

    # the report: |m̂ / (√v̂ + ε)| per tensor, by hand for one tensor after the reset
    report = json.loads((tmp_path / "reset" / "restart.json").read_text())
    assert report["as_saved"] == kept["as_saved"]
    p, g = next(iter(grads.items()))
    state = restarted.opt.state[by_name[names[p]]]
    group = restarted.opt.param_groups[0]
    (b1, b2), t = group["betas"], float(state["step"]) + 1
    m = (b1 * state["exp_avg"] + (1 - b1) * g) / (1 - b1 ** t)
    step = m.abs() / ((g * g / (1 - b2 ** t)).sqrt() + group["eps"])
    got = report["after_reset"]["tensors"][names[p]]
    assert abs(got["max"] - step.max().item()) <= 1e-5 * max(1.0, step.max().item())
    assert report["after_reset"]["max"] >= got["max"]
