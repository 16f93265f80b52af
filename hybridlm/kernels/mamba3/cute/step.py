"""The decode step of a whole Mamba-3 layer as one CuTe-DSL kernel (Hopper and newer).

One CTA per (sequence, head) takes the row of in_proj's output and does everything up to
out_proj's input: Δ, A, λ; RMSNorm, bias and rotation of B and C for every rank; the angle update
(mod 2π); the trapezoid update of the fp32 state in place; the read-out, D skip, gate, grouped
output norm and rank contraction. Math and arguments: hybridlm.kernels.mamba3.oracle.mamba3_decode_step.

Work split. The state (P, N) is read once and written once; that is the cost at large batch, so
its layout decides the rest. A row of N is split over TPR = N / VEC lanes, each holding VEC = 8
values as two 16-byte pieces, float4 ``lane + TPR·j`` (j = 0, 1), so every load instruction of a
group of TPR lanes covers whole 128-byte lines. With that split both rotation layouts keep a pair
inside one thread: interleaved pairs share a float4, and the half-split partner n + N/2 is the
thread's other float4. Row groups of TPR lanes take rows ``group + NG·i``; the rows' read-outs
(Σ_n H[p, n] q[n]) are summed over their TPR lanes by a halving butterfly (each step trades half
the rows a lane holds: about 2·rows shuffles instead of rows·log2 TPR).

Latency. A CTA's life is a chain of memory round trips, and at large batch the number of CTAs
resident per SM times their lifetime is what keeps the state stream busy. So the state loads go
first, and every other global load of the CTA (angles, B/C/k rows, norm weights, biases, the
per-column x, z and mimo vectors) is issued in the same round trip with clamped indices and no
branches; B and C are normalized once per CTA (one warp per vector) into shared memory, with the
new angles' cos/sin and the cached k, and every thread then reads its slots from there.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from hybridlm.kernels.mamba3.cute.layout import VEC

PIECE = 4  # values per 16-byte piece


def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)): exact, and no overflow for large x
    return cute.math.max(x, Float32(0.0)) + cute.math.log1p(cute.math.exp(-cute.math.abs(x)))


def _sigmoid(x):
    return Float32(1.0) / (Float32(1.0) + cute.math.exp(-x))


class _StagedParams(NamedTuple):
    x: object
    z: object
    norm: object
    mx: object
    mz: object
    mo: object


class Mamba3DecodeStep:
    """Compile-time configuration of one layer's step; ``__call__`` is the ``cute.jit`` entry.

    ``columns`` gives the first column of each in_proj segment (``InProjLayout.offsets()``'s
    starts, names z, x, B, C, dt, A and, where present, trap and angle) and ``width`` the row's
    length; ``row_groups`` and ``min_blocks`` are the tiling
    (:func:`hybridlm.kernels.mamba3.cute.kernel_config`)."""

    def __init__(self, *, nheads: int, headdim: int, ngroups: int, rank: int, d_state: int, n_angles: int,
                 interleaved: bool, discretization: str, heavy_tail: bool, A_floor: float, bc_eps: float,
                 out_eps: float, out_mode: int, row_groups: int, min_blocks: int, mimo: bool,
                 columns: Mapping[str, int], width: int, prerotate: bool = False):
        self.H, self.P, self.G, self.R, self.N, self.S = nheads, headdim, ngroups, rank, d_state, n_angles
        self.interleaved = interleaved
        self.discretization = discretization
        self.heavy_tail = heavy_tail
        self.A_floor, self.bc_eps, self.out_eps = A_floor, bc_eps, out_eps
        self.mimo = mimo  # mimo_x, mimo_z, mimo_o are given
        # B and C rotated once per CTA, as the warps normalize them, instead of by every thread at its
        # slots for each rank (KernelTuning.cute_prerotate)
        self.prerotate = prerotate
        self.out_mode = out_mode  # 0 none, 1 pregate grouped, 2 postgate grouped, 3 per-rank y (fp32)
        self.TPR = d_state // VEC  # lanes per state row
        self.NG = row_groups
        self.threads = self.TPR * row_groups
        self.rows = headdim // row_groups  # rows per thread
        self.min_blocks = min_blocks  # CTAs per SM the register budget must allow
        self.col_z, self.col_x, self.col_b, self.col_c = columns["z"], columns["x"], columns["B"], columns["C"]
        self.col_dt, self.col_a = columns["dt"], columns["A"]
        # a segment the layer lacks is never read (its loads sit under const_expr switches)
        self.col_trap, self.col_angle = columns.get("trap", width), columns.get("angle", width)
        self.width = width

    @cute.jit
    def __call__(self, mProj: cute.Tensor, mAngle, mSSM: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
                 mOut: cute.Tensor, mDtBias: cute.Tensor, mBNorm: cute.Tensor, mCNorm: cute.Tensor, mBBias,
                 mCBias, mD: cute.Tensor, mMimoX, mMimoZ, mMimoO, mNormW, stream: cuda.CUstream):
        self.kernel(mProj, mAngle, mSSM, mK, mV, mOut, mDtBias, mBNorm, mCNorm, mBBias, mCBias, mD, mMimoX,
                    mMimoZ, mMimoO, mNormW).launch(
            grid=[mProj.shape[0], self.H, 1], block=[self.threads, 1, 1], stream=stream,
            min_blocks_per_mp=self.min_blocks)

    # -- pieces (plain Python: traced inline, no control flow of their own) --------------------------
    def _slots(self, lane):
        """The thread's VEC state columns n, as a Python list (static j, e; dynamic lane)."""
        return [(lane + self.TPR * j) * PIECE + e for j in range(VEC // PIECE) for e in range(PIECE)]

    def _pair(self, n):
        """Pair index, partner column and whether n is its pair's first (docs/mamba3.md §2.3), for a dynamic n."""
        if const_expr(self.interleaved):
            return n // 2, n ^ 1, (n % 2) == 0
        half = self.N // 2
        first = n < half
        return (cutlass.select_(first, n, n - half), cutlass.select_(first, n + half, n - half), first)

    def _cos_sin(self, sCos, sSin, n):
        """cos θ and ±sin θ of column n's pair (− on the pair's first column); 1, 0 where n does not rotate."""
        if const_expr(self.S == 0):
            return Float32(1.0), Float32(0.0)
        pair, _, first = self._pair(n)
        rotates = pair < self.S
        safe = cutlass.select_(rotates, pair, Int32(0))
        c = cutlass.select_(rotates, sCos[safe], Float32(1.0))
        s = cutlass.select_(rotates, sSin[safe], Float32(0.0))
        return c, cutlass.select_(first, -s, s)

    def _slot_values(self, sVec, base, lane):
        """The thread's VEC slots of the vector at ``base`` in shared memory: two 16-byte loads."""
        vals = []
        for j in range(VEC // PIECE):
            frag = cute.make_rmem_tensor((PIECE,), Float32)
            cute.autovec_copy(cute.local_tile(sVec, (PIECE,), (base // PIECE + lane + self.TPR * j,)), frag)
            vals += [frag[e] for e in range(PIECE)]
        return vals

    def _rotated_slots(self, sVec, base, lane, cos, sin):
        """A normalized, biased B or C (unrotated in shared memory at ``base``) rotated at the slots;
        every slot's partner is one of the thread's own slots (module docstring)."""
        v = self._slot_values(sVec, base, lane)
        mates = [(s ^ 1) if const_expr(self.interleaved) else (s + VEC // 2) % VEC for s in range(VEC)]
        return [v[s] * cos[s] + v[mates[s]] * sin[s] for s in range(VEC)]

    def _vector_slots(self, sVec, base, lane, cos, sin):
        """B_r or C_r at the thread's slots: rotated in shared memory already, or rotated here."""
        if const_expr(self.prerotate):
            return self._slot_values(sVec, base, lane)
        return self._rotated_slots(sVec, base, lane, cos, sin)

    def _rotated_chunks(self, vals, chunk_cs):
        """A warp's B or C values (column lane32 + 32·c in vals[c]) rotated by (cos, ±sin) = chunk_cs[c]: the
        partner of an interleaved pair is the next lane; of a half-split pair, N/2 columns on, a chunk of
        this lane's when N/2 ≥ 32 and a lane N/2 away otherwise (N is a power of two)."""
        half = self.N // 2
        mates = []
        for c in range(len(vals)):
            if const_expr(self.interleaved):
                mates.append(cute.arch.shuffle_sync_bfly(vals[c], offset=1))
            elif const_expr(half >= 32):
                step = half // 32
                mates.append(vals[c + step] if c < step else vals[c - step])
            else:
                mates.append(cute.arch.shuffle_sync_bfly(vals[c], offset=half))
        return [vals[c] * chunk_cs[c][0] + mates[c] * chunk_cs[c][1] for c in range(len(vals))]

    def _reduce_rows(self, partial, lane):
        """Sum each row's partials over the row's TPR lanes, halving the values a lane holds at each
        butterfly step (rows·log2 shuffles become about 2·rows). Returns the sums this lane holds,
        the row index of the first, and whether this lane writes them."""
        vals, first_row, writer = list(partial), Int32(0), None
        offset = self.TPR // 2
        while offset >= 1:
            if len(vals) > 1:
                upper = (lane & offset) != 0
                half = len(vals) // 2
                kept = []
                for k in range(half):
                    send = cutlass.select_(upper, vals[k], vals[k + half])
                    keep = cutlass.select_(upper, vals[k + half], vals[k])
                    kept.append(keep + cute.arch.shuffle_sync_bfly(send, offset=offset))
                vals = kept
                first_row = first_row + cutlass.select_(upper, Int32(half), Int32(0))
            else:
                vals = [vals[0] + cute.arch.shuffle_sync_bfly(vals[0], offset=offset)]
                low = (lane & offset) == 0
                writer = low if writer is None else (writer & low)
            offset //= 2
        return vals, first_row, writer

    # The update's and the read-out's arithmetic, each a method of its own so that benchmarks/cute_step_probe.py
    # can time the step without parts of it (what each costs beside the state's loads and stores).
    def _add_rank_terms(self, vals, cg, k, cb, k_prev):
        """A row's slots plus one rank's trapezoid terms: this token's (γ x_r k_rᵀ) and the last one's
        (β x_prev,r k_prev,rᵀ)."""
        return [vals[s] + cg * k[s] + cb * k_prev[s] for s in range(VEC)]

    def _row_dot(self, vals, q):
        """A row's slots read out against q_r: this lane's part of (H q_r)[p]."""
        acc = Float32(0.0)
        for s in range(VEC):
            acc = acc + vals[s] * q[s]
        return acc

    def _y(self, sY, sP, r, p, d_skip):
        """y_r[p] = (H q_r)[p] + D x_r[p]."""
        x = sP.x[p]
        if const_expr(self.mimo):
            x = x * sP.mx[r * self.P + p]
        return sY[r * self.P + p] + d_skip * x

    def _gated(self, y, sP, r, p):
        """y · silu(z ⊙ mimo_z_r) at column p."""
        z = sP.z[p]
        if const_expr(self.mimo):
            z = z * sP.mz[r * self.P + p]
        return y * z * _sigmoid(z)

    # -- the kernel --------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, mProj: cute.Tensor, mAngle, mSSM: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mOut: cute.Tensor, mDtBias: cute.Tensor, mBNorm: cute.Tensor, mCNorm: cute.Tensor, mBBias,
               mCBias, mD: cute.Tensor, mMimoX, mMimoZ, mMimoO, mNormW):
        tidx, _, _ = cute.arch.thread_idx()
        b, h, _ = cute.arch.block_idx()
        lane = tidx % self.TPR
        group = tidx // self.TPR
        warp = tidx // 32
        lane32 = tidx % 32
        n_warps = self.threads // 32
        g = h // (self.H // self.G)
        R, P, N, S = self.R, self.P, self.N, self.S

        smem = cutlass.memory.SmemAllocator()
        # B_r, C_r (normalized, biased, not rotated) and the cached k_r of the last token, fp32
        sVec = smem.allocate_tensor(Float32, cute.make_layout(3 * R * N), byte_alignment=16)
        sY = smem.allocate_tensor(Float32, cute.make_layout(R * P), byte_alignment=16)
        sSS = smem.allocate_tensor(Float32, cute.make_layout(R), byte_alignment=16)
        sTheta = smem.allocate_tensor(Float32, cute.make_layout(max(S, 1)), byte_alignment=16)
        sCos = smem.allocate_tensor(Float32, cute.make_layout(max(S, 1)), byte_alignment=16)
        sSin = smem.allocate_tensor(Float32, cute.make_layout(max(S, 1)), byte_alignment=16)
        # per column p: x, z, the output-norm weight, and per rank mimo_x, mimo_z, mimo_o
        sP = _StagedParams(
            x=smem.allocate_tensor(Float32, cute.make_layout(P), byte_alignment=16),
            z=smem.allocate_tensor(Float32, cute.make_layout(P), byte_alignment=16),
            norm=smem.allocate_tensor(Float32, cute.make_layout(P), byte_alignment=16),
            mx=smem.allocate_tensor(Float32, cute.make_layout(R * P), byte_alignment=16),
            mz=smem.allocate_tensor(Float32, cute.make_layout(R * P), byte_alignment=16),
            mo=smem.allocate_tensor(Float32, cute.make_layout(R * P), byte_alignment=16),
        )

        # the state loads go first: their latency hides behind everything up to the update
        slots = self._slots(lane)
        rows = [group + self.NG * i for i in range(self.rows)]
        pieces = []
        frags = []
        for i in cutlass.range_constexpr(self.rows):
            row = mSSM[b, h, rows[i], None]
            for j in cutlass.range_constexpr(VEC // PIECE):
                piece = cute.local_tile(row, (PIECE,), (lane + self.TPR * j,))
                frag = cute.make_rmem_tensor((PIECE,), Float32)
                cute.autovec_copy(piece, frag)
                pieces.append(piece)
                frags.append(frag)
        x = [Float32(mProj[b, self.col_x + h * P + p]) for p in rows]
        x_prev = [Float32(mV[b, h, p]) for p in rows]

        # per-head scalars (docs/mamba3.md §2.1)
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

        # Everything else this CTA reads goes into shared memory in one round trip: every load is
        # issued (safe indices, no branches) before the first result is used.
        NT = self.threads
        theta_in = []
        for t in cutlass.range_constexpr((S + NT - 1) // NT):
            j = tidx + NT * t
            j_safe = cutlass.select_(j < S, j, Int32(0))
            theta_in.append((j, Float32(mAngle[b, h, j_safe]), Float32(mProj[b, self.col_angle + j_safe])))
        params_in = []
        for t in cutlass.range_constexpr((P + NT - 1) // NT):
            p = tidx + NT * t
            p_safe = cutlass.select_(p < P, p, Int32(0))
            got = [Float32(mProj[b, self.col_x + h * P + p_safe]), Float32(mProj[b, self.col_z + h * P + p_safe])]
            if const_expr(mNormW is not None):
                got.append(Float32(mNormW[h * P + p_safe]))
            if const_expr(self.mimo):
                for r in cutlass.range_constexpr(R):
                    got += [mMimoX[h, r, p_safe], mMimoZ[h, r, p_safe], mMimoO[h, r, p_safe]]
            params_in.append((p, got))
        # B_r, C_r and the cached k_r: vector v = warp + n_warps·t (kind v // R, rank v % R)
        vec_in = []
        for t in cutlass.range_constexpr((3 * R + n_warps - 1) // n_warps):
            v = warp + n_warps * t
            v_safe = cutlass.select_(v < 3 * R, v, Int32(0))
            kind = v_safe // R
            r = v_safe % R
            col = cutlass.select_(kind == 0, Int32(self.col_b), Int32(self.col_c)) + (r * self.G + g) * N
            chunks = []
            for c in cutlass.range_constexpr((N + 31) // 32):
                n = lane32 + 32 * c
                n_safe = n if const_expr(N % 32 == 0) else cutlass.select_(n < N, n, Int32(0))
                got = [Float32(mProj[b, col + n_safe]), Float32(mK[b, r, h, n_safe]),
                       Float32(mBNorm[n_safe]), Float32(mCNorm[n_safe])]
                if const_expr(mBBias is not None):
                    got += [Float32(mBBias[h, r, n_safe]), Float32(mCBias[h, r, n_safe])]
                chunks.append((n, got))
            vec_in.append((v, kind, chunks))

        # the new angles θ ← (θ + π·tanh(rate)·Δ) mod 2π, with their cos and sin
        for j, old, rate in theta_in:
            th = old + Float32(math.pi) * cute.math.tanh(rate) * dt
            th = th - Float32(2 * math.pi) * cute.math.floor(th * Float32(1 / (2 * math.pi)))
            if j < S:
                sTheta[j] = th
                sCos[j] = cute.math.cos(th)
                sSin[j] = cute.math.sin(th)
        for p, got in params_in:
            if p < P:
                sP.x[p] = got[0]
                sP.z[p] = got[1]
                if const_expr(mNormW is not None):
                    sP.norm[p] = got[2]
                if const_expr(self.mimo):
                    base = 3 if const_expr(mNormW is not None) else 2
                    for r in cutlass.range_constexpr(R):
                        sP.mx[r * P + p] = got[base + 3 * r]
                        sP.mz[r * P + p] = got[base + 3 * r + 1]
                        sP.mo[r * P + p] = got[base + 3 * r + 2]
        chunk_cs = []  # prerotating: cos and ±sin at each of the lane's columns lane32 + 32·c, every vector's
        if const_expr(self.prerotate):
            cute.arch.sync_threads()  # the new angles' cos and sin, for the rotation below
            for c in cutlass.range_constexpr((N + 31) // 32):
                n = lane32 + 32 * c
                chunk_cs.append(self._cos_sin(sCos, sSin, n if const_expr(N % 32 == 0)
                                              else cutlass.select_(n < N, n, Int32(0))))
        # B and C after RMSNorm (over N: the warp's lanes) and bias (and, prerotating, rotated); the cached k as it is
        for v, kind, chunks in vec_in:
            ss = Float32(0.0)
            for n, got in chunks:
                raw = got[0] if const_expr(N % 32 == 0) else cutlass.select_(n < N, got[0], Float32(0.0))
                ss = ss + raw * raw
            for k in cutlass.range_constexpr(5):
                ss = ss + cute.arch.shuffle_sync_bfly(ss, offset=16 >> k)
            rstd = cute.math.rsqrt(ss / Float32(N) + Float32(self.bc_eps))
            vals = []
            for n, got in chunks:
                is_b = kind == 0
                val = got[0] * rstd * cutlass.select_(is_b, got[2], got[3])
                if const_expr(mBBias is not None):
                    val = val + cutlass.select_(is_b, got[4], got[5])
                vals.append(val)
            if const_expr(self.prerotate):
                vals = self._rotated_chunks(vals, chunk_cs)
            for c, (n, got) in enumerate(chunks):
                val = cutlass.select_(kind < 2, vals[c], got[1])
                if v < 3 * R and n < N:
                    sVec[v * N + n] = val
        cute.arch.sync_threads()

        cos, sin = [], []
        if const_expr(not self.prerotate):
            for s in cutlass.range_constexpr(VEC):
                cos_s, sin_s = self._cos_sin(sCos, sSin, slots[s])
                cos.append(cos_s)
                sin.append(sin_s)

        # H ← αH + Σ_r [γ (x⊙mimo_x_r) k_rᵀ + β (x_prev⊙mimo_x_r) k_prev_rᵀ]
        state = []
        for i in cutlass.range_constexpr(self.rows):
            vals = []
            for j in cutlass.range_constexpr(VEC // PIECE):
                for e in cutlass.range_constexpr(PIECE):
                    vals.append(frags[i * (VEC // PIECE) + j][e] * alpha)
            state.append(vals)
        for r in cutlass.range_constexpr(R):
            k = self._vector_slots(sVec, r * N, lane, cos, sin)
            k_prev = self._slot_values(sVec, (2 * R + r) * N, lane)
            for i in cutlass.range_constexpr(self.rows):
                mx = Float32(1.0)
                if const_expr(self.mimo):
                    mx = sP.mx[r * P + rows[i]]
                state[i] = self._add_rank_terms(state[i], gamma * x[i] * mx, k, beta * x_prev[i] * mx, k_prev)
        for i in cutlass.range_constexpr(self.rows):
            for j in cutlass.range_constexpr(VEC // PIECE):
                frag = frags[i * (VEC // PIECE) + j]
                for e in cutlass.range_constexpr(PIECE):
                    frag[e] = state[i][j * PIECE + e]
                cute.autovec_copy(frag, pieces[i * (VEC // PIECE) + j])

        # (H q_r)[p]: each row's sum over its TPR lanes
        for r in cutlass.range_constexpr(R):
            q = self._vector_slots(sVec, (R + r) * N, lane, cos, sin)
            partial = [self._row_dot(state[i], q) for i in range(self.rows)]
            sums, first_row, writer = self._reduce_rows(partial, lane)
            for k in cutlass.range_constexpr(len(sums)):
                p = group + self.NG * (first_row + k)
                if const_expr(writer is None):
                    sY[r * P + p] = sums[k]
                else:
                    if writer:
                        sY[r * P + p] = sums[k]
        cute.arch.sync_threads()

        d_skip = Float32(mD[h])
        # grouped norms: Σ_p y_r[p]² (pre-gate) or Σ_p (y_r[p] gate_r[p])² (post-gate), one warp per rank
        if const_expr(self.out_mode == 1 or self.out_mode == 2):
            for r in cutlass.range_constexpr(R):
                if warp == r % n_warps:
                    acc = Float32(0.0)
                    for c in cutlass.range_constexpr((P + 31) // 32):
                        p = lane32 + 32 * c
                        if p < P:
                            val = self._y(sY, sP, r, p, d_skip)
                            if const_expr(self.out_mode == 2):
                                val = self._gated(val, sP, r, p)
                            acc = acc + val * val
                    for k in cutlass.range_constexpr(5):
                        acc = acc + cute.arch.shuffle_sync_bfly(acc, offset=16 >> k)
                    if lane32 == 0:
                        sSS[r] = acc
            cute.arch.sync_threads()

        # gate, norm, rank contraction; then the small states, now that every thread has read them
        for p in cutlass.range(tidx, P, self.threads):
            if const_expr(self.out_mode == 3):
                for r in cutlass.range_constexpr(R):
                    mOut[b, r, h * P + p] = self._y(sY, sP, r, p, d_skip)
            else:
                o = Float32(0.0)
                for r in cutlass.range_constexpr(R):
                    y = self._y(sY, sP, r, p, d_skip)
                    if const_expr(self.out_mode == 0):
                        y = self._gated(y, sP, r, p)
                    elif const_expr(self.out_mode == 1):
                        y = self._gated(y * cute.math.rsqrt(sSS[r] / Float32(P) + Float32(self.out_eps))
                                        * sP.norm[p], sP, r, p)
                    else:
                        y = (self._gated(y, sP, r, p)
                             * cute.math.rsqrt(sSS[r] / Float32(P) + Float32(self.out_eps)) * sP.norm[p])
                    if const_expr(self.mimo):
                        y = y * sP.mo[r * P + p]
                    o = o + y
                mOut[b, h * P + p] = o.to(mOut.element_type)
            mV[b, h, p] = sP.x[p].to(mV.element_type)  # exact: x came in this dtype
        for idx in cutlass.range(tidx, R * N, self.threads):
            if const_expr(self.prerotate):  # sVec holds B rotated
                mK[b, idx // N, h, idx % N] = sVec[idx].to(mK.element_type)
            else:
                r = idx // N
                n = idx % N
                _, mate, _ = self._pair(n)
                cos_n, sin_n = self._cos_sin(sCos, sSin, n)
                mK[b, r, h, n] = (sVec[idx] * cos_n + sVec[r * N + mate] * sin_n).to(mK.element_type)
        if const_expr(S > 0):
            for j in cutlass.range(tidx, S, self.threads):
                mAngle[b, h, j] = sTheta[j]


def compile_step(op: Mamba3DecodeStep, *, proj_dtype: str, kv_dtype: str, norm_dtype: str, has_bias: bool,
                 has_norm: bool):
    """Compile ``op`` for tensors of these cutlass dtype names ("BFloat16", ...), batch symbolic.

    Needs no GPU (set CUTE_DSL_ARCH=sm_90a to compile elsewhere); the result takes torch tensors
    through tvm-ffi and launches on torch's current stream."""
    H, P, R, N, S = op.H, op.P, op.R, op.N, op.S
    batch = cute.sym_int()

    def fake(dtype, shape, align=None):  # row-major, as torch's contiguous tensors
        order = tuple(reversed(range(len(shape))))
        return cute.runtime.make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=align)

    f32, pd, kd, nd = Float32, getattr(cutlass, proj_dtype), getattr(cutlass, kv_dtype), getattr(cutlass, norm_dtype)
    width = op.width
    out = fake(f32, (batch, R, H * P)) if op.out_mode == 3 else fake(pd, (batch, H * P))
    args = (
        fake(pd, (batch, width)), fake(f32, (batch, H, S)) if S else None, fake(f32, (batch, H, P, N), 16),
        fake(kd, (batch, R, H, N)), fake(kd, (batch, H, P)), out,
        fake(f32, (H,)), fake(nd, (N,)), fake(nd, (N,)),
        fake(f32, (H, R, N)) if has_bias else None, fake(f32, (H, R, N)) if has_bias else None,
        fake(f32, (H,)),
        *((fake(f32, (H, R, P)) if op.mimo else None) for _ in range(3)),
        fake(nd, (H * P,)) if has_norm else None,
    )
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, *args, stream, options="--enable-tvm-ffi")
