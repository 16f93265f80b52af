"""Δ's and A's activations as Triton functions (docs/mamba3.md §2.1), shared by the kernels that compute
them: torch's softplus (threshold 20) to fp32 precision, and heavy_tail."""
import triton
import triton.language as tl


@triton.jit
def _log1p(u):
    # log(1 + u) to fp32 precision for small u (log(1 + u) alone loses it below u ≈ 1e-4): the
    # rounding of w = 1 + u cancels in log(w) / (w − 1)
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def softplus(x):
    # torch's softplus (threshold 20), computed without overflow and exactly for negative x
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x))))


@triton.jit
def a_magnitude(x, HEAVY_TAIL: tl.constexpr):
    """|A| before its floor: heavy_tail(x) = 1 + relu(x) + (1 / (1 − min(x, 0)) − 1), or softplus(x)."""
    if HEAVY_TAIL:
        return 1.0 + tl.maximum(x, 0.0) + (1.0 / (1.0 - tl.minimum(x, 0.0)) - 1.0)
    else:
        return softplus(x)


@triton.jit
def a_magnitude_slope(x, HEAVY_TAIL: tl.constexpr):
    """d|A|/dx: heavy_tail's 1 above 0 and 1 / (1 − x)² below (torch's relu passes nothing at 0, the
    clamp's branch passes 1 there: 1 either way); softplus's sigmoid(x), 1 past the threshold."""
    if HEAVY_TAIL:
        below = 1.0 - tl.minimum(x, 0.0)
        return tl.where(x > 0.0, 1.0, 1.0 / (below * below))
    else:
        return tl.where(x > 20.0, 1.0, tl.sigmoid(x))
