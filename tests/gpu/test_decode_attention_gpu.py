"""The Triton split-KV decode attention kernel on the GPU (issue 21): transformer-1.5b's heads
(16 q, 4 kv, head_dim 128), bf16 caches whose rows hold 1 .. 3,000 tokens of 4,096 positions,
against the fp64 reference on the same bf16 values and against FA4's cached form where FA4 runs;
CUDA-graph replay bitwise equal to the eager call. Set HYBRIDLM_RESULTS_DECODE_ATTENTION=path.json
to write the measured errors."""
import pytest
import torch

from hybridlm.kernels import fa4
from hybridlm.kernels.decode_attention import reference
from hybridlm.kernels.tickets import counters
from hybridlm.testing import rel_err, write_results

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)

RESULTS: dict = {}
# bf16 inputs, fp32 scores and sums; the probabilities rounded to bf16 for the second product (as
# FlashAttention does) and the output rounded once: about two rounding steps (2^-8) normwise at most.
BOUND = 8e-3


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    write_results("HYBRIDLM_RESULTS_DECODE_ATTENTION", RESULTS)


def caches(batch, lengths, window_seed=0):
    g = torch.Generator(device="cuda").manual_seed(window_seed)
    q = torch.randn(batch, 1, 16, 128, generator=g, device="cuda").bfloat16()
    k, v = (torch.randn(batch, 4096, 4, 128, generator=g, device="cuda").bfloat16() for _ in range(2))
    return q, k, v, torch.tensor(lengths, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("lengths", [[2049], [1, 700, 3000], [4096] * 8], ids=["batch1", "batch3", "batch8-full"])
@pytest.mark.parametrize("window", [None, 512])
def test_decode_attention_kernel_against_fp64_and_fa4(lengths, window):
    from hybridlm.kernels.decode_attention import triton as kernel

    q, k, v, used = caches(len(lengths), lengths)
    got = kernel.decode_attention(q, k, v, used, window=window, scale=128 ** -0.5)
    want = reference.decode_attention(q.double(), k.double(), v.double(), used, window=window, scale=128 ** -0.5)
    key = f"{len(lengths)}-rows-window{window}"
    RESULTS[key] = {"vs_fp64": rel_err(got, want)}
    if not fa4.import_error():
        theirs = fa4.fa4_cached_attention(q, k, v, used, window=window, scale=128 ** -0.5)
        RESULTS[key]["fa4_vs_fp64"] = rel_err(theirs, want)
    assert RESULTS[key]["vs_fp64"] <= BOUND
    assert torch.equal(kernel.decode_attention(q, k, v, used, window=window, scale=128 ** -0.5), got)
    assert not counters(q.device, "decode_attention").any()


def test_decode_attention_kernel_in_a_cuda_graph():
    """Captured once, replayed with the lengths advanced on the device: bitwise the eager call each time."""
    from hybridlm.kernels.decode_attention import triton as kernel

    q, k, v, used = caches(2, [100, 2000])
    kernel.decode_attention(q, k, v, used)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel.decode_attention(q, k, v, used)
    for _ in range(5):
        used += 37
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, kernel.decode_attention(q, k, v, used))
