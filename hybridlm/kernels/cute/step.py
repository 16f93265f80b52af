"""The decode step of a whole Mamba-3 layer as one CuTe-DSL kernel (Hopper and newer).

One CTA per (sequence, head) takes the row of in_proj's output and does everything up to
out_proj's input: Δ, A, λ; RMSNorm, bias and rotation of B and C for every rank; the angle update
(mod 2π); the trapezoid update of the fp32 state in place; the read-out, D skip, gate, grouped
output norm and rank contraction. Math and arguments: hybridlm.kernels.reference.mamba3_decode_step.

Work split. The state (P, N) is read once and written once; that is the cost at large batch, so
its layout decides the rest. A row of N is split over TPR = N / VEC lanes, each holding VEC = 8
values as two 16-byte pieces, float4 ``lane + TPR·j`` (j = 0, 1), so every load instruction of a
group of TPR lanes covers whole 128-byte lines. With that split both rotation layouts keep a pair
inside one thread: interleaved pairs share a float4, and the half-split partner n + N/2 is the
thread's other float4. Row groups of TPR lanes take rows ``group + NG·i``; a row's read-out
(Σ_n H[p, n] q[n]) is a butterfly over its TPR lanes. B, C and the per-slot angles are computed
by every row group for its own slots (cheap next to the state).
"""
from __future__ import annotations

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

VEC = 8  # state values per thread per row: two float4
PIECE = 4  # values per 16-byte piece


def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)): exact, and no overflow for large x
    return cute.math.max(x, Float32(0.0)) + cute.math.log1p(cute.math.exp(-cute.math.abs(x)))


def _sigmoid(x):
    return Float32(1.0) / (Float32(1.0) + cute.math.exp(-x))


class Mamba3DecodeStep:
    """Compile-time configuration of one layer's step; ``__call__`` is the ``cute.jit`` entry."""

    def __init__(self, *, nheads: int, headdim: int, ngroups: int, rank: int, d_state: int, n_angles: int,
                 interleaved: bool, discretization: str, heavy_tail: bool, A_floor: float, bc_eps: float,
                 out_eps: float, out_mode: int, row_groups: int):
        self.H, self.P, self.G, self.R, self.N, self.S = nheads, headdim, ngroups, rank, d_state, n_angles
        self.interleaved = interleaved
        self.discretization = discretization
        self.heavy_tail = heavy_tail
        self.A_floor, self.bc_eps, self.out_eps = A_floor, bc_eps, out_eps
        self.out_mode = out_mode  # 0 none, 1 pregate grouped, 2 postgate grouped, 3 per-rank y (fp32)
        self.TPR = d_state // VEC  # lanes per state row
        self.NG = row_groups
        self.threads = self.TPR * row_groups
        self.rows = headdim // row_groups  # rows per thread
        HP, W = nheads * headdim, rank * ngroups * d_state
        self.col_x, self.col_b, self.col_c = HP, 2 * HP, 2 * HP + W
        self.col_dt = 2 * HP + 2 * W
        self.col_a = self.col_dt + nheads
        self.col_trap = self.col_a + nheads
        self.col_angle = self.col_trap + (nheads if discretization == "trapezoid" else 0)

    @cute.jit
    def __call__(self, mProj: cute.Tensor, mAngle, mSSM: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
                 mOut: cute.Tensor, mDtBias: cute.Tensor, mBNorm: cute.Tensor, mCNorm: cute.Tensor, mBBias,
                 mCBias, mD: cute.Tensor, mMimoX, mMimoZ, mMimoO, mNormW, stream: cuda.CUstream):
        self.kernel(mProj, mAngle, mSSM, mK, mV, mOut, mDtBias, mBNorm, mCNorm, mBBias, mCBias, mD, mMimoX,
                    mMimoZ, mMimoO, mNormW).launch(
            grid=[mProj.shape[0], self.H, 1], block=[self.threads, 1, 1], stream=stream)

    # -- pieces ------------------------------------------------------------------------------------
    def _slots(self, lane):
        """The thread's VEC state columns n, as a Python list (static j, e; dynamic lane)."""
        return [(lane + self.TPR * j) * PIECE + e for j in range(VEC // PIECE) for e in range(PIECE)]

    def _rotation(self, mAngle, mProj, b, h, dt, slots):
        """Per slot: θ_new (0 where the slot does not rotate), cos θ and ±sin θ (− on a pair's first)."""
        theta, cos, sin = [], [], []
        for s in range(VEC):
            n = slots[s]
            j = s // PIECE
            if const_expr(self.interleaved):
                pair = n // 2
                first = s % 2 == 0
            else:
                first = j < (VEC // PIECE) // 2
                pair = n if first else n - self.N // 2
            th = Float32(0.0)
            if const_expr(self.S > 0):
                rotates = pair < self.S
                safe = cutlass.select_(rotates, pair, Int32(0))
                old = Float32(mAngle[b, h, safe])
                rate = Float32(mProj[b, self.col_angle + safe])
                new = old + Float32(math.pi) * cute.math.tanh(rate) * dt
                new = new - Float32(2 * math.pi) * cute.math.floor(new * Float32(1 / (2 * math.pi)))
                th = cutlass.select_(rotates, new, Float32(0.0))
            theta.append(th)
            cos.append(cute.math.cos(th))
            sin.append(-cute.math.sin(th) if first else cute.math.sin(th))
        return theta, cos, sin

    def _bc(self, mProj, col, mNorm, mBias, b, h, g, r, slots, cos, sin):
        """B or C of rank r for head h at the thread's slots: RMSNorm, + bias, rotated."""
        base = col + (r * self.G + g) * self.N
        raw = [Float32(mProj[b, base + slots[s]]) for s in range(VEC)]
        ss = Float32(0.0)
        for s in range(VEC):
            ss = ss + raw[s] * raw[s]
        for k in range(int(math.log2(self.TPR))):
            ss = ss + cute.arch.shuffle_sync_bfly(ss, offset=self.TPR >> (k + 1))
        rstd = cute.math.rsqrt(ss / Float32(self.N) + Float32(self.bc_eps))
        v = []
        for s in range(VEC):
            val = raw[s] * rstd * Float32(mNorm[slots[s]])
            if const_expr(mBias is not None):
                val = val + Float32(mBias[h, r, slots[s]])
            v.append(val)
        out = []
        for s in range(VEC):
            if const_expr(self.interleaved):
                mate = s ^ 1
            else:
                mate = (s + VEC // 2) % VEC
            out.append(v[s] * cos[s] + v[mate] * sin[s])
        return out

    # -- the kernel --------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, mProj: cute.Tensor, mAngle, mSSM: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mOut: cute.Tensor, mDtBias: cute.Tensor, mBNorm: cute.Tensor, mCNorm: cute.Tensor, mBBias,
               mCBias, mD: cute.Tensor, mMimoX, mMimoZ, mMimoO, mNormW):
        tidx, _, _ = cute.arch.thread_idx()
        b, h, _ = cute.arch.block_idx()
        lane = tidx % self.TPR
        group = tidx // self.TPR
        g = h // (self.H // self.G)
        R, P, N = self.R, self.P, self.N

        smem = cutlass.utils.SmemAllocator()
        sK = smem.allocate_tensor(Float32, cute.make_layout(R * N), byte_alignment=16)
        sY = smem.allocate_tensor(Float32, cute.make_layout(R * P), byte_alignment=16)
        sSS = smem.allocate_tensor(Float32, cute.make_layout(R), byte_alignment=16)

        # per-head scalars (docs §2.1)
        dt = _softplus(Float32(mProj[b, self.col_dt + h]) + Float32(mDtBias[h]))
        a_raw = Float32(mProj[b, self.col_a + h])
        if const_expr(self.heavy_tail):
            zero = Float32(0.0)
            a_mag = (Float32(1.0) + cute.math.max(a_raw, zero)
                     + (Float32(1.0) / (Float32(1.0) - cute.math.min(a_raw, zero)) - Float32(1.0)))
        else:
            a_mag = _softplus(a_raw)
        A = -cute.math.max(a_mag, Float32(self.A_floor))
        if const_expr(self.discretization == "trapezoid"):
            lam = _sigmoid(Float32(mProj[b, self.col_trap + h]))
        elif const_expr(self.discretization == "euler"):
            lam = Float32(1.0)
        else:
            lam = Float32(0.5)
        alpha = cute.math.exp(A * dt)
        beta = (Float32(1.0) - lam) * dt * alpha
        gamma = lam * dt

        slots = self._slots(lane)
        theta, cos, sin = self._rotation(mAngle, mProj, b, h, dt, slots)

        # the thread's rows of the state, α·H, kept in registers from load to store
        rows = [group + self.NG * i for i in range(self.rows)]
        x = [Float32(mProj[b, self.col_x + h * P + p]) for p in rows]
        x_prev = [Float32(mV[b, h, p]) for p in rows]
        pieces = []
        state = []
        for i in cutlass.range_constexpr(self.rows):
            row = mSSM[b, h, rows[i], None]
            vals = []
            for j in cutlass.range_constexpr(VEC // PIECE):
                piece = cute.local_tile(row, (PIECE,), (lane + self.TPR * j,))
                frag = cute.make_rmem_tensor((PIECE,), Float32)
                cute.autovec_copy(piece, frag)
                pieces.append(piece)
                for e in cutlass.range_constexpr(PIECE):
                    vals.append(frag[e] * alpha)
            state.append(vals)

        # H ← αH + Σ_r [γ (x⊙mimo_x_r) k_rᵀ + β (x_prev⊙mimo_x_r) k_prev_rᵀ]
        for r in cutlass.range_constexpr(R):
            k = self._bc(mProj, self.col_b, mBNorm, mBBias, b, h, g, r, slots, cos, sin)
            k_prev = [Float32(mK[b, r, h, slots[s]]) for s in range(VEC)]
            for i in cutlass.range_constexpr(self.rows):
                mx = Float32(1.0)
                if const_expr(mMimoX is not None):
                    mx = Float32(mMimoX[h, r, rows[i]])
                cg = gamma * x[i] * mx
                cb = beta * x_prev[i] * mx
                for s in cutlass.range_constexpr(VEC):
                    state[i][s] = state[i][s] + cg * k[s] + cb * k_prev[s]
            if group == 0:
                for s in cutlass.range_constexpr(VEC):
                    sK[r * N + slots[s]] = k[s]
        for i in cutlass.range_constexpr(self.rows):
            for j in cutlass.range_constexpr(VEC // PIECE):
                frag = cute.make_rmem_tensor((PIECE,), Float32)
                for e in cutlass.range_constexpr(PIECE):
                    frag[e] = state[i][j * PIECE + e]
                cute.autovec_copy(frag, pieces[i * (VEC // PIECE) + j])

        # y_r[p] = Σ_n H[p, n] q_r[n] + D x_r[p], one butterfly over the row's lanes
        d_skip = Float32(mD[h])
        for r in cutlass.range_constexpr(R):
            q = self._bc(mProj, self.col_c, mCNorm, mCBias, b, h, g, r, slots, cos, sin)
            for i in cutlass.range_constexpr(self.rows):
                acc = Float32(0.0)
                for s in cutlass.range_constexpr(VEC):
                    acc = acc + state[i][s] * q[s]
                for k in cutlass.range_constexpr(int(math.log2(self.TPR))):
                    acc = acc + cute.arch.shuffle_sync_bfly(acc, offset=self.TPR >> (k + 1))
                mx = Float32(1.0)
                if const_expr(mMimoX is not None):
                    mx = Float32(mMimoX[h, r, rows[i]])
                if lane == 0:
                    sY[r * P + rows[i]] = acc + d_skip * x[i] * mx
        cute.arch.sync_threads()

        # grouped norms: Σ_p y_r[p]² (pre-gate) or Σ_p (y_r[p] gate_r[p])² (post-gate), one warp per rank
        if const_expr(self.out_mode == 1 or self.out_mode == 2):
            warp = tidx // 32
            wlane = tidx % 32
            n_warps = self.threads // 32
            for r in cutlass.range_constexpr(R):
                if warp == r % n_warps:
                    acc = Float32(0.0)
                    for c in cutlass.range_constexpr((P + 31) // 32):
                        p = wlane + 32 * c
                        if p < P:
                            val = sY[r * P + p]
                            if const_expr(self.out_mode == 2):
                                val = self._gated(val, mProj, mMimoZ, b, h, r, p)
                            acc = acc + val * val
                    for k in cutlass.range_constexpr(5):
                        acc = acc + cute.arch.shuffle_sync_bfly(acc, offset=16 >> k)
                    if wlane == 0:
                        sSS[r] = acc
            cute.arch.sync_threads()

        # gate, norm, rank contraction; then the small states, now that every thread has read them
        for p in cutlass.range(tidx, P, self.threads):
            if const_expr(self.out_mode == 3):
                for r in cutlass.range_constexpr(R):
                    mOut[b, r, h * P + p] = sY[r * P + p]
            else:
                o = Float32(0.0)
                for r in cutlass.range_constexpr(R):
                    y = sY[r * P + p]
                    if const_expr(self.out_mode == 0):
                        y = self._gated(y, mProj, mMimoZ, b, h, r, p)
                    elif const_expr(self.out_mode == 1):
                        y = self._gated(y * cute.math.rsqrt(sSS[r] / Float32(P) + Float32(self.out_eps))
                                        * Float32(mNormW[h * P + p]), mProj, mMimoZ, b, h, r, p)
                    else:
                        y = (self._gated(y, mProj, mMimoZ, b, h, r, p)
                             * cute.math.rsqrt(sSS[r] / Float32(P) + Float32(self.out_eps)) * Float32(mNormW[h * P + p]))
                    if const_expr(mMimoO is not None):
                        y = y * Float32(mMimoO[h, r, p])
                    o = o + y
                mOut[b, h * P + p] = o.to(mOut.element_type)
            mV[b, h, p] = mProj[b, self.col_x + h * P + p].to(mV.element_type)
        for idx in cutlass.range(tidx, R * N, self.threads):
            mK[b, idx // N, h, idx % N] = sK[idx].to(mK.element_type)
        if group == 0:
            for s in cutlass.range_constexpr(VEC):
                n = slots[s]
                if const_expr(self.S > 0):
                    if const_expr(self.interleaved):
                        if s % 2 == 0 and n // 2 < self.S:
                            mAngle[b, h, n // 2] = theta[s]
                    else:
                        if s < VEC // 2 and n < self.S:
                            mAngle[b, h, n] = theta[s]

    def _gated(self, y, mProj, mMimoZ, b, h, r, p):
        """y · silu(z ⊙ mimo_z_r) at column p of head h."""
        z = Float32(mProj[b, h * self.P + p])
        if const_expr(mMimoZ is not None):
            z = z * Float32(mMimoZ[h, r, p])
        return y * z * _sigmoid(z)


def compile_step(op: Mamba3DecodeStep, *, proj_dtype: str, kv_dtype: str, norm_dtype: str, has_bias: bool,
                 has_mimo: bool, has_norm: bool):
    """Compile ``op`` for tensors of these cutlass dtype names ("BFloat16", ...), batch symbolic.

    Needs no GPU (set CUTE_DSL_ARCH=sm_90a to compile elsewhere); the result takes torch tensors
    through tvm-ffi and launches on torch's current stream."""
    H, P, R, N, S = op.H, op.P, op.R, op.N, op.S
    batch = cute.sym_int()

    def fake(dtype, shape, align=None):  # row-major, as torch's contiguous tensors
        order = tuple(reversed(range(len(shape))))
        return cute.runtime.make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=align)

    f32, pd, kd, nd = Float32, getattr(cutlass, proj_dtype), getattr(cutlass, kv_dtype), getattr(cutlass, norm_dtype)
    width = op.col_angle + S
    out = fake(f32, (batch, R, H * P)) if op.out_mode == 3 else fake(pd, (batch, H * P))
    args = (
        fake(pd, (batch, width)), fake(f32, (batch, H, S)) if S else None, fake(f32, (batch, H, P, N), 16),
        fake(kd, (batch, R, H, N)), fake(kd, (batch, H, P)), out,
        fake(f32, (H,)), fake(nd, (N,)), fake(nd, (N,)),
        fake(f32, (H, R, N)) if has_bias else None, fake(f32, (H, R, N)) if has_bias else None,
        fake(f32, (H,)),
        *((fake(f32, (H, R, P)) if has_mimo else None) for _ in range(3)),
        fake(nd, (H * P,)) if has_norm else None,
    )
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, *args, stream, options="--enable-tvm-ffi")
