"""benchmarks/op_replay.py, the tool that finds which kernel a GPU run gets wrong: a recording replays to the
same outputs, and a recording with one wrong output points at that op."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("hybridlm.kernels.mamba3.triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import op_replay  # noqa: E402


def test_replay_finds_the_op_whose_recorded_output_is_wrong():
    args = op_replay.parser().parse_args(["--record", "unused", "--device", "cpu", "--d-model", "32", "--d-state",
                                          "16", "--headdim", "8", "--seqlen", "10", "--dtype", "fp32"])
    calls = op_replay.record_layer(args)
    assert [c[0] for c in calls] == ["mamba3_inputs_fwd", "token_walk_fwd", "mamba3_chunk_fwd", "gated_output_fwd",
                                     "gated_output_bwd", "mamba3_chunk_bwd", "token_walk_bwd", "mamba3_inputs_bwd"]
    errors = op_replay.replay_errors(calls)
    assert all(e is None or e <= 1e-6 for _, errs in errors for e in errs), errors
    name, op_args, op_kwargs, outputs = calls[5]  # the backward chunk kernel: its first output (dq) made wrong
    outputs[0].mul_(1.5)
    errors = op_replay.replay_errors(calls)
    assert errors[5][1][0] > 0.3 and all(e is None or e <= 1e-6 for i, (_, errs) in enumerate(errors)
                                         for j, e in enumerate(errs) if (i, j) != (5, 0))
