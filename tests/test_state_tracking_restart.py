"""The restart of a paused state-tracking run with Adam's second moments kept or floored
(hybridlm/studies/state_tracking_restart.py): the moments it writes and the update sizes it reports."""
import json

import torch

from hybridlm.studies import state_tracking_restart as restart
from hybridlm.studies.state_tracking_train import Trainer
from test_state_tracking_protocol import tiny


def test_floor_raises_each_second_moment_to_the_next_gradients_square_and_keep_changes_nothing(tmp_path):
    settings = tiny(diagnostics_every=0)
    source = tmp_path / "run"
    assert Trainer(settings, source, "k").train(stop_after_steps=3) == "paused"
    flags = settings.to_flags()

    assert restart.main([str(source), str(tmp_path / "keep"), "--second-moments", "keep", "--run-key", "k", *flags]) == 0
    assert (tmp_path / "keep" / "checkpoint.pt").read_bytes() == (source / "checkpoint.pt").read_bytes()
    kept = json.loads((tmp_path / "keep" / "restart.json").read_text())
    assert kept["step"] == 3 and "after_floor" not in kept

    assert restart.main([str(source), str(tmp_path / "floor"), "--second-moments", "floor", "--run-key", "k",
                         *flags]) == 0
    reference = Trainer(settings, source, "k")
    reference.resume()
    grads = restart.next_gradients(reference)
    names = {p: n for n, p in reference.model.named_parameters()}
    saved = torch.load(tmp_path / "floor" / "checkpoint.pt", weights_only=False)
    restarted = Trainer(settings, tmp_path / "floor", "k")
    restarted.resume()
    by_name = dict(restarted.model.named_parameters())
    raised = 0
    for p, g in grads.items():
        before = reference.opt.state[p]["exp_avg_sq"]
        after = restarted.opt.state[by_name[names[p]]]["exp_avg_sq"]
        assert torch.equal(after, torch.maximum(before, g * g)), names[p]
        raised += int((after > before).sum())
    assert raised > 0 and saved["step"] == 3  # some moments were below the new gradient's square

    # the report: |m̂ / (√v̂ + ε)| per tensor, by hand for one tensor after the floor; never above the kept one's
    report = json.loads((tmp_path / "floor" / "restart.json").read_text())
    assert report["as_saved"] == kept["as_saved"]
    p, g = next(iter(grads.items()))
    state = restarted.opt.state[by_name[names[p]]]
    group = restarted.opt.param_groups[0]
    (b1, b2), t = group["betas"], float(state["step"]) + 1
    m = (b1 * state["exp_avg"] + (1 - b1) * g) / (1 - b1 ** t)
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    step = m.abs() / ((v / (1 - b2 ** t)).sqrt() + group["eps"])
    got = report["after_floor"]["tensors"][names[p]]
    assert abs(got["max"] - step.max().item()) <= 1e-5 * max(1.0, step.max().item())
    assert report["after_floor"]["max"] <= report["as_saved"]["max"] + 1e-6
