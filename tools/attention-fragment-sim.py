#!/usr/bin/env python3
# Lane-by-lane emulation of kernels/attention.cu's forward and backward (the ldmatrix / mma.sync
# m16n8k16 fragment layouts of the PTX ISA, the kernels' shared-memory address formulas, mask,
# online softmax, dS^T staging, dQ partials), compared with a dense float64 reference. It checks
# the index arithmetic without a GPU; keep it in step with the kernel when the tiling changes.
#   python3 -m venv /tmp/v && /tmp/v/bin/pip install numpy && /tmp/v/bin/python tools/attention-fragment-sim.py
# Prints max errors relative to the largest reference value (bf16-level, ~5e-3, when right).
import numpy as np
L = np.arange(32); G = L >> 2; T = L & 3

def bf(x):
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)

def ldsm(sm, addr):           # addr: [32] element offsets; returns [4][32][2]
    out = np.zeros((4, 32, 2), np.float32)
    for i in range(4):
        ra = addr[8 * i + G]
        out[i, :, 0] = sm[ra + 2 * T]; out[i, :, 1] = sm[ra + 2 * T + 1]
    return out

def ldsm_t(sm, addr):
    out = np.zeros((4, 32, 2), np.float32)
    for i in range(4):
        out[i, :, 0] = sm[addr[8 * i + 2 * T] + G]; out[i, :, 1] = sm[addr[8 * i + 2 * T + 1] + G]
    return out

def mma(c, a, b0, b1):        # c [32][4]; a [4][32][2]; b0,b1 [32][2]
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for l in range(32):
        g, t = l >> 2, l & 3
        A[g, 2*t:2*t+2] = a[0][l]; A[g+8, 2*t:2*t+2] = a[1][l]
        A[g, 2*t+8:2*t+10] = a[2][l]; A[g+8, 2*t+8:2*t+10] = a[3][l]
        B[2*t:2*t+2, g] = b0[l]; B[2*t+8:2*t+10, g] = b1[l]
        C[g, 2*t:2*t+2] = c[l, 0:2]; C[g+8, 2*t:2*t+2] = c[l, 2:4]
    D = A @ B + C
    for l in range(32):
        g, t = l >> 2, l & 3
        c[l, 0:2] = D[g, 2*t:2*t+2]; c[l, 2:4] = D[g+8, 2*t:2*t+2]

def pack(lo, hi): return np.stack([bf(lo), bf(hi)], -1)   # [32][2]
def acc_to_a(c0, c1): return np.stack([pack(c0[:,0], c0[:,1]), pack(c0[:,2], c0[:,3]), pack(c1[:,0], c1[:,1]), pack(c1[:,2], c1[:,3])])

def allowed(i, j, ps, pe): return (i == j) | ~((i >= ps) & (i < pe) & (j >= ps) & (j < pe))

WARPS, BC, BQ = 4, 64, 64

def load_tile(rows, DH, X, t0, n):   # X: [n, DH] global rows; returns flat smem with stride DH+8
    S = DH + 8; sm = np.zeros(rows * S, np.float32)
    for r in range(rows):
        if t0 + r < n: sm[r*S:r*S+DH] = X[t0 + r]
    return sm

def fwd(Q, K, V, ps, pe, qs, nq, scale, DH, MT):
    N = Q.shape[0]; BR = 16*MT*WARPS; SROW = DH+8; KD = DH//16; ND = DH//8; NK = BC//8
    out = np.full((nq, DH), np.nan, np.float32); lse = np.full(nq, np.nan, np.float32)
    sl2 = np.float32(scale * 1.4426950408889634)
    for qb in range((nq + BR - 1)//BR):
        q0 = qb*BR
        sQ = load_tile(BR, DH, Q, qs + q0, qs + nq)
        for warp in range(WARPS):
            wrow = warp*16*MT
            qf = [[ldsm(sQ, (wrow + mt*16 + (L & 15))*SROW + kk*16 + (L >> 4)*8) for kk in range(KD)] for mt in range(MT)]
            o = np.zeros((MT, ND, 32, 4), np.float32); m = np.full((MT, 2, 32), -np.inf, np.float32); l = np.zeros((MT, 2, 32), np.float32)
            q_prompt = ps < pe and qs + q0 < pe and qs + q0 + BR > ps
            for j in range((N + BC - 1)//BC):
                k0 = j*BC
                sK = load_tile(BC, DH, K, k0, N); sV = load_tile(BC, DH, V, k0, N)
                s = np.zeros((MT, NK, 32, 4), np.float32)
                for kk in range(KD):
                    for np_ in range(NK//2):
                        b = ldsm(sK, (np_*16 + (L & 7) + (L >> 4)*8)*SROW + kk*16 + ((L >> 3) & 1)*8)
                        for mt in range(MT):
                            mma(s[mt, 2*np_], qf[mt][kk], b[0], b[1]); mma(s[mt, 2*np_+1], qf[mt][kk], b[2], b[3])
                k_prompt = k0 < pe and k0 + BC > ps
                if k0 + BC > N or (q_prompt and k_prompt):
                    for mt in range(MT):
                        for nt in range(NK):
                            for e in range(4):
                                qi = qs + q0 + wrow + mt*16 + G + (e >> 1)*8
                                kj = k0 + nt*8 + 2*T + (e & 1)
                                bad = (kj >= N) | ~allowed(qi, kj, ps, pe)
                                s[mt, nt, bad, e] = -np.inf
                for mt in range(MT):
                    for r in range(2):
                        mx = m[mt, r].copy()
                        for nt in range(NK): mx = np.maximum(mx, np.maximum(s[mt, nt, :, 2*r], s[mt, nt, :, 2*r+1]))
                        mx = np.maximum(mx, mx[L ^ 1]); mx = np.maximum(mx, mx[L ^ 2])
                        base = np.where(mx == -np.inf, 0, mx*sl2)
                        alpha = np.exp2(m[mt, r]*sl2 - base)
                        m[mt, r] = mx
                        ssum = np.zeros(32, np.float32)
                        for nt in range(NK):
                            for c in range(2):
                                p = np.exp2(s[mt, nt, :, 2*r+c]*sl2 - base); s[mt, nt, :, 2*r+c] = p; ssum += p
                        l[mt, r] = l[mt, r]*alpha + ssum
                        o[mt, :, :, 2*r] *= alpha; o[mt, :, :, 2*r+1] *= alpha
                for kc in range(BC//16):
                    pa = [acc_to_a(s[mt, 2*kc], s[mt, 2*kc+1]) for mt in range(MT)]
                    for dp in range(ND//2):
                        b = ldsm_t(sV, (kc*16 + (L & 7) + ((L >> 3) & 1)*8)*SROW + dp*16 + (L >> 4)*8)
                        for mt in range(MT):
                            mma(o[mt, 2*dp], pa[mt], b[0], b[1]); mma(o[mt, 2*dp+1], pa[mt], b[2], b[3])
            stage = np.zeros(BR*SROW, np.float32)
            for mt in range(MT):
                for r in range(2):
                    ssum = l[mt, r].copy(); ssum = ssum + ssum[L ^ 1]; ssum = ssum + ssum[L ^ 2]
                    inv = 1/ssum; row = wrow + mt*16 + G + r*8
                    for dt in range(ND):
                        pk = pack(o[mt, dt, :, 2*r]*inv, o[mt, dt, :, 2*r+1]*inv)
                        stage[row*SROW + dt*8 + 2*T] = pk[:, 0]; stage[row*SROW + dt*8 + 2*T + 1] = pk[:, 1]
                    qi = q0 + row
                    for ln in range(32):
                        if T[ln] == 0 and qi[ln] < nq: lse[qi[ln]] = m[mt, r, ln]*scale + np.log(ssum[ln])
            CH = DH//8
            for i in range(16*MT*CH//32):
                c = L + 32*i; r = c // CH; k = c % CH
                for ln in range(32):
                    qi = q0 + wrow + r[ln]
                    if qi < nq: out[qi, k[ln]*8:k[ln]*8+8] = stage[(wrow + r[ln])*SROW + k[ln]*8:(wrow + r[ln])*SROW + k[ln]*8 + 8]
    return out, lse

def bwd(Q, K, V, O, dO, lse, ps, pe, qs, nq, scale, DH):
    N = Q.shape[0]; SROW = DH+8; PROW = BQ+8; KD = DH//16; ND = DH//8; NQ = BQ//8
    dvec = (O.astype(np.float64) * dO).sum(1).astype(np.float32)
    dq_acc = np.zeros((nq, DH), np.float32); dK = np.full((N, DH), np.nan, np.float32); dV = dK.copy()
    sl2 = np.float32(scale * 1.4426950408889634)
    for kb in range((N + BC - 1)//BC):
        k0 = kb*BC
        sK = load_tile(BC, DH, K, k0, N); sV = load_tile(BC, DH, V, k0, N)
        k_prompt = ps < pe and k0 < pe and k0 + BC > ps
        dk = np.zeros((WARPS, ND, 32, 4), np.float32); dv = dk.copy()
        kf = []
        for warp in range(WARPS):
            a_off = (warp*16 + (L & 15))*SROW + (L >> 4)*8
            kf.append([ldsm(sK, a_off + kk*16) for kk in range(KD)])
        for step in range((nq + BQ - 1)//BQ):
            q0 = step*BQ
            sQ = load_tile(BQ, DH, Q, qs + q0, qs + nq); sdO = load_tile(BQ, DH, dO, q0, nq)
            sL = np.array([lse[q0+i]*1.4426950408889634 if q0+i < nq else 0 for i in range(BQ)], np.float32)
            sD = np.array([dvec[q0+i] if q0+i < nq else 0 for i in range(BQ)], np.float32)
            sdS = np.zeros(BC*PROW, np.float32)
            for warp in range(WARPS):
                wk = warp*16; a_off = (wk + (L & 15))*SROW + (L >> 4)*8
                s = np.zeros((NQ, 32, 4), np.float32); dp = s.copy()
                for kk in range(KD):
                    vf = ldsm(sV, a_off + kk*16)
                    for np_ in range(NQ//2):
                        off = (np_*16 + (L & 7) + (L >> 4)*8)*SROW + kk*16 + ((L >> 3) & 1)*8
                        bq = ldsm(sQ, off); bo = ldsm(sdO, off)
                        mma(s[2*np_], kf[warp][kk], bq[0], bq[1]); mma(s[2*np_+1], kf[warp][kk], bq[2], bq[3])
                        mma(dp[2*np_], vf, bo[0], bo[1]); mma(dp[2*np_+1], vf, bo[2], bo[3])
                masked = q0 + BQ > nq or k0 + BC > N or (k_prompt and qs + q0 < pe and qs + q0 + BQ > ps)
                for nt in range(NQ):
                    for e in range(4):
                        qloc = nt*8 + 2*T + (e & 1)
                        p = np.exp2(s[nt, :, e]*sl2 - sL[qloc])
                        if masked:
                            kj = k0 + wk + G + (e >> 1)*8; qi = q0 + qloc
                            p = np.where((qi >= nq) | (kj >= N) | ~allowed(qs + qi, kj, ps, pe), 0, p)
                        s[nt, :, e] = p; dp[nt, :, e] = p*(dp[nt, :, e] - sD[qloc])
                for kc in range(BQ//16):
                    pa = acc_to_a(s[2*kc], s[2*kc+1]); da = acc_to_a(dp[2*kc], dp[2*kc+1])
                    for np_ in range(ND//2):
                        off = (kc*16 + (L & 7) + ((L >> 3) & 1)*8)*SROW + np_*16 + (L >> 4)*8
                        bo = ldsm_t(sdO, off); bq = ldsm_t(sQ, off)
                        mma(dv[warp, 2*np_], pa, bo[0], bo[1]); mma(dv[warp, 2*np_+1], pa, bo[2], bo[3])
                        mma(dk[warp, 2*np_], da, bq[0], bq[1]); mma(dk[warp, 2*np_+1], da, bq[2], bq[3])
                    d0 = (wk + G)*PROW + kc*16 + 2*T
                    for (off, reg) in [(0, 0), (8*PROW, 1), (8, 2), (8*PROW + 8, 3)]:
                        sdS[d0 + off] = da[reg][:, 0]; sdS[d0 + off + 1] = da[reg][:, 1]
            for warp in range(WARPS):
                wk = warp*16
                dqp = np.zeros((ND, 32, 4), np.float32)
                for kc in range(BC//16):
                    mi = L >> 3
                    a = ldsm_t(sdS, (kc*16 + (L & 7) + (mi >> 1)*8)*PROW + wk + (mi & 1)*8)
                    for np_ in range(ND//2):
                        bk = ldsm_t(sK, (kc*16 + (L & 7) + ((L >> 3) & 1)*8)*SROW + np_*16 + (L >> 4)*8)
                        mma(dqp[2*np_], a, bk[0], bk[1]); mma(dqp[2*np_+1], a, bk[2], bk[3])
                for r in range(2):
                    qi = q0 + wk + G + r*8
                    for ln in range(32):
                        if qi[ln] < nq:
                            for dt in range(ND):
                                dq_acc[qi[ln], dt*8 + 2*T[ln]] += dqp[dt, ln, 2*r]; dq_acc[qi[ln], dt*8 + 2*T[ln] + 1] += dqp[dt, ln, 2*r+1]
        for warp in range(WARPS):
            wk = warp*16
            for r in range(2):
                for ln in range(32):
                    kj = k0 + wk + G[ln] + r*8
                    if kj < N:
                        for dt in range(ND):
                            c = dt*8 + 2*T[ln]
                            dK[kj, c:c+2] = bf(np.array([dk[warp, dt, ln, 2*r], dk[warp, dt, ln, 2*r+1]])*scale)
                            dV[kj, c:c+2] = bf(np.array([dv[warp, dt, ln, 2*r], dv[warp, dt, ln, 2*r+1]]))
    dQ = np.zeros((N, DH), np.float32); dQ[qs:qs + nq] = bf(dq_acc*scale)
    return dQ, dK, dV

def reference(Q, K, V, dO, ps, pe, qs, nq, scale):
    N = Q.shape[0]; i = np.arange(qs, qs + nq)[:, None]; j = np.arange(N)[None, :]
    S = (Q[qs:qs + nq].astype(np.float64) @ K.T) * scale
    S = np.where(allowed(i, j, ps, pe), S, -np.inf)
    mx = S.max(1, keepdims=True); P = np.exp(S - mx); l = P.sum(1, keepdims=True); P /= l
    O = P @ V; lse = (mx + np.log(l))[:, 0]
    dP = dO @ V.T; Dv = (dO * O).sum(1, keepdims=True); dS = P*(dP - Dv)
    dQ = np.zeros((N, Q.shape[1])); dQ[qs:qs + nq] = dS @ K * scale
    return O, lse, dQ, dS.T @ Q[qs:qs + nq] * scale, P.T @ dO

rng = np.random.default_rng(1)
for (N, ps, pe, qs, nq, DH, MT) in [(1, 1, 1, 0, 1, 64, 2), (200, 1, 100, 0, 200, 64, 2), (130, 50, 120, 0, 130, 32, 2),
                                   (129, 1, 2, 0, 129, 64, 2), (150, 1, 31, 1, 30, 64, 2), (140, 1, 61, 40, 90, 32, 2)]:
    Q, K, V = (bf(rng.uniform(-2, 2, (N, DH))) for _ in range(3)); dO = bf(rng.uniform(-1, 1, (nq, DH)))
    scale = 1/np.sqrt(DH)
    O, lse, dQ, dK, dV = reference(Q, K, V, dO, ps, pe, qs, nq, scale)
    o, l = fwd(Q, K, V, ps, pe, qs, nq, np.float32(scale), DH, MT)
    gq, gk, gv = bwd(Q, K, V, o, dO, l, ps, pe, qs, nq, np.float32(scale), DH)
    rel = lambda a, b: np.nanmax(np.abs(a - b)) / np.abs(b).max() if not np.isnan(a).any() else np.inf
    print(f"N={N} P=[{ps},{pe}) q=[{qs},{qs + nq}) dh={DH}: out {rel(o, O):.2e} lse {np.abs(l - lse).max():.2e} dQ {rel(gq, dQ):.2e} dK {rel(gk, dK):.2e} dV {rel(gv, dV):.2e} abs dQ {np.abs(gq-dQ).max():.1e} dK {np.abs(gk-dK).max():.1e} maxref dK {np.abs(dK).max():.2e}")
