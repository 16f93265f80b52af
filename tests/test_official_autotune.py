"""The official kernels' autotune choices: read from Triton's cache, saved, pinned without tuning.

A real Triton autotuner on a small kernel (interpreted on the CPU) stands in for mamba_ssm's: a
pinned key must be found in its cache, so the kernel runs the pinned config and never benchmarks.
"""
import ast
import json

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from hybridlm.kernels.official_autotune import (  # noqa: E402
    chosen_from_triton_cache, config_entry, gpu_slug, merge_into, pin_chosen)
from hybridlm.studies.official_control import CHOICES_DIR  # noqa: E402

CONFIGS = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=2)]


@triton.autotune(configs=CONFIGS, key=["n"])
@triton.jit
def _scaled_copy(src, dst, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst + offsets, 2 * tl.load(src + offsets, mask=mask), mask=mask)


def _run(tuner, n=40):
    src = torch.arange(n, dtype=torch.float32)
    dst = torch.zeros_like(src)
    tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](src, dst, n)
    return src, dst


@pytest.fixture
def tuner(monkeypatch):
    def no_benchmark(*args, **kwargs):
        raise AssertionError("the autotuner benchmarked: the pinned key was not in its cache")

    monkeypatch.setattr(_scaled_copy, "_bench", no_benchmark)
    monkeypatch.setattr(_scaled_copy, "cache", {})
    return _scaled_copy


def test_pinned_choice_runs_without_tuning(tmp_path, tuner):
    # Triton's key: the key arguments' values, then each tensor argument's dtype (src, dst)
    key = (40, "torch.float32", "torch.float32")
    merge_into(tmp_path / "choices.json", {"kernels.scaled_copy": {repr(key): config_entry(CONFIGS[1])}})
    assert pin_chosen(tmp_path / "choices.json", {"kernels.scaled_copy": tuner}) == 1
    src, dst = _run(tuner)
    assert tuner.best_config.kwargs == {"BLOCK": 32} and tuner.best_config.num_warps == 2
    torch.testing.assert_close(dst, 2 * src, rtol=0, atol=0)


def test_unknown_kernels_and_notes_are_skipped(tmp_path, tuner):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"_source": {"note": "where these came from"},
                                "mamba_ssm.gone.kernel": {"(1,)": config_entry(CONFIGS[0])}}))
    assert pin_chosen(path, {"kernels.scaled_copy": tuner}) == 0


def test_choice_read_from_triton_cache_is_the_fastest(tmp_path):
    key = [64, 16, False, "torch.bfloat16"]
    slow, fast = ({**cfg.__dict__, "pre_hook": None} for cfg in CONFIGS)
    folder = tmp_path / "cache" / "ABCDEF"
    folder.mkdir(parents=True)
    (folder / "my_kernel.autotune.json").write_text(json.dumps(
        {"key": key, "configs_timings": [[slow, [0.9, 0.8, 1.0]], [fast, [0.5, 0.4, 0.6]]]}))
    (folder / "other_kernel.autotune.json").write_text(json.dumps({"key": key, "configs_timings": []}))
    chosen = chosen_from_triton_cache(tmp_path / "cache", {"my_kernel": "pkg.mod.my_kernel"})
    assert chosen == {"pkg.mod.my_kernel": {"(64, 16, False, 'torch.bfloat16')": config_entry(CONFIGS[1])}}


def test_the_controls_h200_choices_parse():
    path = CHOICES_DIR / f"official-autotune-{gpu_slug('NVIDIA H200')}.json"
    choices = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    assert len(choices) == 7 and all(name.startswith("mamba_ssm.ops.triton.mamba3.") for name in choices)
    for entries in choices.values():
        for key, config in entries.items():
            assert isinstance(ast.literal_eval(key), tuple) and config["num_warps"] in (1, 2, 4, 8)


@pytest.mark.parametrize("name, slug", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                        ("Some Card", "some_card")])
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug


def test_the_control_pins_only_where_a_file_for_its_gpu_exists(monkeypatch):
    import hybridlm.kernels.official_autotune as official_autotune
    from hybridlm.studies.official_control import pin_official_choices

    pinned_from = []
    monkeypatch.setattr(official_autotune, "pin_chosen", lambda path: pinned_from.append(path.name) or 8)
    pin_official_choices.cache_clear()
    try:
        assert pin_official_choices("NVIDIA A100-SXM4-80GB") == 0 and pinned_from == []  # no file: it tunes
        assert pin_official_choices("NVIDIA H200") == 8 and pinned_from == ["official-autotune-h200.json"]
    finally:
        pin_official_choices.cache_clear()
