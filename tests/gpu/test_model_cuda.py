"""The whole model on the GPU (reference kernels): same function as on the CPU."""
import pytest
import torch

from hybridlm import build_model, get_preset
from hybridlm.testing import rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", ["tiny-hybrid", "mamba3-mimo-tiny", "mamba2like-tiny"])
def test_cuda_model_matches_cpu(preset):
    spec = get_preset(preset)
    cpu = build_model(spec, seed=0).eval()
    gpu = build_model(spec, device="cuda", seed=0).eval()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, spec.vocab_size, (2, 100))
    with torch.no_grad():
        err = rel_err(gpu(ids.cuda()).cpu(), cpu(ids))
    assert err <= 1e-4  # TF32 is off by default for matmuls; differences are fp32 reduction order
    out_gpu = gpu.generate(ids[:, :8].cuda(), 12, temperature=0).cpu()
    out_cpu = cpu.generate(ids[:, :8], 12, temperature=0)
    assert (out_gpu == out_cpu).float().mean() >= 0.9  # greedy ties may flip on near-equal logits


def test_bf16_cuda_model_close_to_fp32():
    spec = get_preset("tiny-hybrid")
    ref = build_model(spec, device="cuda", seed=0).eval()
    half = build_model(spec, device="cuda", dtype=torch.bfloat16, seed=0).eval()
    half.load_state_dict({k: v.to(half.state_dict()[k].dtype) for k, v in ref.state_dict().items()})
    ids = torch.randint(0, 256, (4, 256), device="cuda")
    with torch.no_grad():
        assert rel_err(half(ids).float(), ref(ids)) <= 5e-2
