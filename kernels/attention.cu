// Fused multi-head attention with the prompt-augmented mask
// (docs/MODEL.md#the-prompt-augmented-attention-mask), FlashAttention-2 style:
// bf16 Q, K, V `[B, N, h, dh]` read by strides (AttnParams, src/contract.rs: straight from the
// qkv projection `qkv [B, N, 3, h, dh]`, or separate tensors), fp32 online softmax and
// accumulation on tensor cores (mma.sync m16n8k16 bf16 -> f32), output `out [B, Nq, h, dh]`
// (strided) bf16 and the per-row log-sum-exp `lse [B, h, Nq]` (f32, natural log of
// the scaled scores) that the backward uses to recompute the probabilities. Queries are the
// tokens [qs, qs + Nq) (all N in every block but the model's last, which needs only the
// prompts); keys and values are always all N tokens.
//
// Mask (structural, no tensor): tokens [ps, pe) are prompts; a prompt query does not see the
// other prompts' keys (it sees CLS, itself and every key >= pe); other queries see all keys.
// Keys >= N (tile padding) are -inf. Every row keeps key 0 and itself, so no row is empty.
//
// Kernels (host launchers in src/ops/attention/cuda.rs), each taking one AttnParams, per head
// dim DH in {32, 64, 80, 128} (ATTN_HEAD_DIMS; tile shapes in ATTN_FWD_CONFIGS /
// ATTN_BWD_CONFIGS, generated from src/contract.rs into contract.cuh, instantiated at the end;
// dynamic shared memory sized by the launcher from the same tables):
//   attn_fwd_dDH       grid (ceil(Nq/BR), B*h), 128 threads; 16*MT query rows per warp (BR =
//                      128 rows per block at dh 32, 64; 64 at 80, 128 and in the alternatives
//                      attn_fwd_d64_r64 and attn_fwd_d64_r64p, the software-pipelined one).
//   attn_bwd_pre_dDH   D_i = rowsum(dO_i * O_i) into dvec [B, h, Nq]; zeroes dq_acc.
//   attn_bwd_dDH       grid (ceil(N/BK), B*h), a warp per 16 keys: one block per BK = 64 keys
//                      (128 in the alternative attn_bwd_d64_k128), loops over the queries BQ
//                      at a time; dK, dV in registers, written once (bf16) into dqkv; dQ
//                      partials added with fp32 atomics into dq_acc [B, Nq, h*dh].
//   attn_bwd_dq_convert    dq = scale * dq_acc (bf16; zero outside the queries).
//   attn_bwd_d64_split, attn_bwd_d64_split_dq: the alternative split backward: dK, dV (and the
//                      zero dQ rows outside the queries) key-stationary, then dQ in a
//                      query-stationary pass like the forward; no dq_acc, no atomics.
//   attn_split_heads, attn_softmax_rows_bf16, attn_softmax_bwd_rows_bf16: the unfused peer
//                          used by benches/gpu_attention.rs (cuBLAS GEMMs around them).
//   attn_simple_fwd, attn_simple_bwd: the plain fp32 attention (PlainAttnParams) for head
//                      dims without fused kernels; grid (Nq, B*h), the row's scores in shared
//                      memory (end of this file).
// The PTX wrappers are in ptx.cuh. tests/ops/attention.rs checks every kernel here against the
// CPU reference (in CI on the virtual CUDA device of tools/vgpu, under its sanitizer checks).
// dQ is summed by atomics in whatever order the key blocks finish, so its last bits may differ
// between runs; out, lse, dK, dV are deterministic.
//
// ---- Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16" with .bf16) ----------
// lane = 0..31, g = lane >> 2 (groupID), t = lane & 3 (thread in group). Each .b32 register
// holds two bf16, the lower 16 bits being the element with the smaller column (k) index.
//   A (16 x 16, row-major, M x K), 4 regs:
//     a0 = A[g    ][2t, 2t+1]   a1 = A[g + 8][2t, 2t+1]
//     a2 = A[g    ][2t+8, +9]   a3 = A[g + 8][2t+8, +9]
//   B (16 x 8, K x N, "col"), 2 regs:
//     b0 = B[2t, 2t+1][g]       b1 = B[2t+8, 2t+9][g]
//   C/D (16 x 8, f32), 4 regs:
//     c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g + 8][2t, 2t+1]
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of 8x8 matrix i (16 bytes each);
// register ri of lane receives matrix i's row (lane >> 2) = g, elements 2t, 2t+1. With .trans
// it receives elements [row 2t][col g] and [row 2t+1][col g] (the transpose's row g).
// Hence, for a 16x16 block stored row-major with rows r and columns c:
//   A operand (rows = M):        lane address row = lane & 15, col = (lane >> 4) * 8.
//   B operand for two n-tiles when the block is stored [n][k] (K^T of a row-major K):
//       row (n) = (lane & 7) + (lane >> 4) * 8, col (k) = ((lane >> 3) & 1) * 8;
//       r0, r1 = b0, b1 of n-tile 0; r2, r3 = b0, b1 of n-tile 1.
//   B operand for two n-tiles when stored [k][n] (V row-major), with .trans:
//       row (k) = (lane & 7) + ((lane >> 3) & 1) * 8, col (n) = (lane >> 4) * 8;
//       r0, r1 = b0, b1 of n-tile 0; r2, r3 = b0, b1 of n-tile 1.
//   A operand when stored transposed [k][m], with .trans (matrix i = lane >> 3):
//       row (k) = (lane & 7) + (i >> 1) * 8, col (m) = (i & 1) * 8.
// The f32 accumulators of two adjacent n-tiles (keys 16c..16c+15) are an A operand over those
// keys after packing: a0 = (C0.c0, C0.c1), a1 = (C0.c2, C0.c3), a2 = (C1.c0, C1.c1),
// a3 = (C1.c2, C1.c3).
// Shared-memory rows are padded by 16 bytes (stride dh + 8 elements), so the 8 row addresses
// of each ldmatrix matrix fall in 8 distinct 16-byte bank groups (no conflicts).
#include "common.cuh"
#include "ptx.cuh"

namespace attn {

constexpr int WARPS = ATTN_WARPS;
constexpr int THREADS = 32 * WARPS;
constexpr int BC = ATTN_KEY_TILE;  // keys per tile of the forward (the backward has its own, 16 per warp)
constexpr float LOG2E = 1.4426950408889634f;
static_assert(ATTN_SMEM_PAD == 8, "shared rows are padded by 16 bytes (the ldmatrix addressing below)");

// Tile shapes: MT m-tiles of 16 query rows per warp in the forward (BR = 16 MT WARPS rows per
// block), BQ query rows per step of the backward; sized per head dim so that the accumulators
// fit the 255 registers of a thread without spilling. The compiled ones and their dynamic shared
// memory (rows padded to DH + 8 elements; at head dims 80 and 128 more than the 48 KB a static
// array may take) come from src/contract.rs, the one place the launcher reads them too; the
// virtual device's memcheck (tools/vgpu) fails a launch given less shared memory than used.

// p[0] += a, p[1] += b in device memory (p 8-byte aligned): one vector reduction on sm_90.
__device__ __forceinline__ void add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Two floats -> bf16x2 (round to nearest even), `lo` in the lower half.
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    bf162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Accumulator tile `a` (two n-tiles 2c, 2c+1) as an A operand.
__device__ __forceinline__ void acc_to_a(uint32_t (&r)[4], const float (&c0)[4], const float (&c1)[4]) {
    r[0] = pack(c0[0], c0[1]);
    r[1] = pack(c0[2], c0[3]);
    r[2] = pack(c1[0], c1[1]);
    r[3] = pack(c1[2], c1[3]);
}

// ROWS rows of DH bf16 from global (row r = token t0 + r at g + token * gstride) into shared
// memory at stride DH + 8, zero-filling tokens >= n. Issued by the whole block; not committed.
template <int ROWS, int DH, int NT = THREADS>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, size_t gstride, int t0, int n) {
    constexpr int CH = DH / 8;
#pragma unroll
    for (int i = 0; i < (ROWS * CH + NT - 1) / NT; i++) {
        const int c = threadIdx.x + i * NT;
        if ((ROWS * CH) % NT != 0 && c >= ROWS * CH) break;
        const int r = c / CH, k = c % CH;
        const int tok = t0 + r;
        const bool ok = tok < n;
        const bf16* src = g + (size_t)(ok ? tok : 0) * gstride + k * 8;
        cp_async16(smem_u32(s + r * (DH + 8) + k * 8), src, ok);
    }
}

// Whether query i may see key j (both < N).
__device__ __forceinline__ bool allowed(int i, int j, int ps, int pe) {
    return i == j || !(i >= ps && i < pe && j >= ps && j < pe);
}

// Whether query token i sees key token j < n: allowed() and j < n, with bitwise operators
// only, so an unrolled mask loop compiles to predicated selects, not branches (the backward's;
// in the forward the extra live predicates cost registers the 168-register kernels lack).
__device__ __forceinline__ bool visible(int i, int j, int n, int ps, int pe) {
    const unsigned np = (unsigned)(pe - ps);
    const bool ip = (unsigned)(i - ps) < np, jp = (unsigned)(j - ps) < np;
    return (j < n) & ((i == j) | !(ip & jp));
}

// One (image, head) of the block (blockIdx.y = b * H + hh): where its Q, K, V rows start.
struct HeadView {
    int bh, b, hh;
    const bf16 *q, *k, *v;
};
__device__ __forceinline__ HeadView head_view(const AttnParams& p) {
    HeadView h;
    h.bh = blockIdx.y;
    h.b = h.bh / p.h;
    h.hh = h.bh % p.h;
    h.q = p.q + h.b * p.q_batch_stride + h.hh * p.q_head_stride;
    h.k = p.k + h.b * p.k_batch_stride + h.hh * p.k_head_stride;
    h.v = p.v + h.b * p.v_batch_stride + h.hh * p.v_head_stride;
    return h;
}

// ------------------------------------------------------------------------------ forward
// The forward's pieces, per warp: MT m-tiles of 16 query rows against a tile of BC keys.

// s = Q K^T for one key tile in shared memory (rows at stride DH + 8).
template <int DH, int MT>
__device__ __forceinline__ void qk_tile(float (&s)[MT][BC / 8][4], const uint32_t (&qf)[MT][DH / 16][4],
                                        const bf16* sK, int lane) {
    constexpr int SROW = DH + 8, KD = DH / 16, NK = BC / 8;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NK; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[mt][nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KD; kk++) {
#pragma unroll
        for (int np = 0; np < NK / 2; np++) {
            uint32_t bfr[4];
            ldsm_x4(bfr, smem_u32(sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SROW + kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma(s[mt][2 * np], qf[mt][kk], bfr[0], bfr[1]);
                mma(s[mt][2 * np + 1], qf[mt][kk], bfr[2], bfr[3]);
            }
        }
    }
}

// Masks the scores of keys k0 .. k0 + BC: -inf past N and where a prompt query meets another
// prompt's key. `qi0` is the token of the warp's first row. Called only for tiles that cross N
// or meet the prompt block (the others need no mask).
template <int MT>
__device__ __forceinline__ void mask_tile(float (&s)[MT][BC / 8][4], int qi0, int k0, int N, int ps, int pe, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qi = qi0 + mt * 16 + g + (e >> 1) * 8;
                const int kj = k0 + nt * 8 + 2 * t + (e & 1);
                if (kj >= N || !allowed(qi, kj, ps, pe)) s[mt][nt][e] = -INFINITY;
            }
}

// Online softmax over one tile: scores s become probabilities (relative to the new running
// max m), the running sums l and the accumulators o are rescaled. Each row lives in the 4
// lanes of a quad (2 rows per m-tile); l stays a per-lane partial until the end.
template <int DH, int MT>
__device__ __forceinline__ void softmax_tile(float (&s)[MT][BC / 8][4], float (&m)[MT][2], float (&l)[MT][2],
                                             float (&o)[MT][DH / 8][4], float sl2) {
    constexpr int NK = BC / 8, ND = DH / 8;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = m[mt][r];
#pragma unroll
            for (int nt = 0; nt < NK; nt++) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            const float base = mx == -INFINITY ? 0.0f : mx * sl2;
            const float alpha = exp2_approx(m[mt][r] * sl2 - base);
            m[mt][r] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NK; nt++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const float p = exp2_approx(fmaf(s[mt][nt][2 * r + c], sl2, -base));
                    s[mt][nt][2 * r + c] = p;
                    sum += p;
                }
            l[mt][r] = l[mt][r] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < ND; dt++) {
                o[mt][dt][2 * r] *= alpha;
                o[mt][dt][2 * r + 1] *= alpha;
            }
        }
}

// o += P V for one key tile of V in shared memory.
template <int DH, int MT>
__device__ __forceinline__ void pv_tile(float (&o)[MT][DH / 8][4], const float (&p)[MT][BC / 8][4], const bf16* sV,
                                        int lane) {
    constexpr int SROW = DH + 8, ND = DH / 8;
#pragma unroll
    for (int kc = 0; kc < BC / 16; kc++) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) acc_to_a(pa[mt], p[mt][2 * kc], p[mt][2 * kc + 1]);
#pragma unroll
        for (int dp = 0; dp < ND / 2; dp++) {
            uint32_t bfr[4];
            ldsm_x4_t(bfr, smem_u32(sV + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + dp * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma(o[mt][2 * dp], pa[mt], bfr[0], bfr[1]);
                mma(o[mt][2 * dp + 1], pa[mt], bfr[2], bfr[3]);
            }
        }
    }
}

// MT m-tiles of 16 query rows per warp; BR = 16 * MT * WARPS rows per block. Two schedules:
//   PIPE false: per key tile j, S_j = Q K_j^T, softmax, O += P V_j; K_{j+1} loads during the
//     P V product and V_j during Q K^T (one buffer each, two barriers per tile).
//   PIPE true: software-pipelined (FlashAttention-3's overlap, on mma.sync): iteration j
//     issues S_{j+1} = Q K_{j+1}^T, then the softmax of S_j, then O += P_j V_j, so the
//     tensor-core products of the next tile are independent of the exps of this one and the
//     scheduler can interleave them; K and V are double-buffered and the loads for the next
//     iteration have a whole iteration to land (one barrier per tile).
template <int DH, int MT, bool PIPE>
__device__ __forceinline__ void fwd(const AttnParams& p) {
    const int N = p.n, ps = p.ps, pe = p.pe, qs = p.qs, nq = p.nq;
    const float scale = p.scale;
    float* __restrict__ lse = p.lse;
    constexpr int BR = 16 * MT * WARPS;
    constexpr int SROW = DH + 8;
    constexpr int KD = DH / 16;  // k-chunks over the head dim
    constexpr int ND = DH / 8;   // n-tiles over the head dim
    constexpr int NK = BC / 8;   // n-tiles over the keys of a tile
    constexpr int NBUF = PIPE ? 2 : 1;
    bf16* sQ = reinterpret_cast<bf16*>(dyn_smem());  // [BR][SROW]
    bf16* sK = sQ + BR * SROW;                        // NBUF x [BC][SROW]
    bf16* sV = sK + NBUF * BC * SROW;                 // NBUF x [BC][SROW]

    const HeadView hv = head_view(p);
    const int bh = hv.bh;
    const size_t qrs = p.q_row_stride, krs = p.k_row_stride, vrs = p.v_row_stride;
    const bf16 *qg = hv.q, *kg = hv.k, *vg = hv.v;
    const int q0 = blockIdx.x * BR;  // first query row (of nq) of this block; token qs + q0
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wrow = warp * 16 * MT;  // first row of this warp inside the block

    load_tile<BR, DH>(sQ, qg, qrs, qs + q0, qs + nq);
    load_tile<BC, DH>(sK, kg, krs, 0, N);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    uint32_t qf[MT][KD][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int kk = 0; kk < KD; kk++)
            ldsm_x4(qf[mt][kk], smem_u32(sQ + (wrow + mt * 16 + (lane & 15)) * SROW + kk * 16 + (lane >> 4) * 8));

    float o[MT][ND][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int dt = 0; dt < ND; dt++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[mt][dt][e] = 0.0f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.0f;
    }
    const float sl2 = scale * LOG2E;
    const bool q_prompt = ps < pe && qs + q0 < pe && qs + q0 + BR > ps;
    const int ntiles = (N + BC - 1) / BC;
    // Whether key tile k0 needs the mask (crosses N, or meets the prompt block of a block
    // holding prompt queries).
    auto needs_mask = [&](int k0) { return k0 + BC > N || (q_prompt && k0 < pe && k0 + BC > ps); };

    if constexpr (!PIPE) {
        for (int j = 0; j < ntiles; j++) {
            const int k0 = j * BC;
            if (j > 0) {
                cp_async_wait_all();  // K_j landed
                __syncthreads();      // ... for every thread; every warp is done with V_{j-1}
            }
            load_tile<BC, DH>(sV, vg, vrs, k0, N);
            cp_async_commit();

            float s[MT][NK][4];
            qk_tile<DH, MT>(s, qf, sK, lane);
            if (needs_mask(k0)) mask_tile<MT>(s, qs + q0 + wrow, k0, N, ps, pe, lane);
            softmax_tile<DH, MT>(s, m, l, o, sl2);

            cp_async_wait_all();  // V_j landed
            __syncthreads();      // ... for every thread; every warp is done with K_j
            if (j + 1 < ntiles) {
                load_tile<BC, DH>(sK, kg, krs, k0 + BC, N);
                cp_async_commit();
            }
            pv_tile<DH, MT>(o, s, sV, lane);
        }
    } else {
        // K_j and V_j in buffer j % 2. On entry K_0 (and Q) are in shared memory. The last
        // tile is peeled off, so the body of the loop is one basic block from the product of
        // the next tile to P V: no branch keeps the scheduler from interleaving them.
        auto kbuf = [&](int j) { return sK + (j & 1) * BC * SROW; };
        auto vbuf = [&](int j) { return sV + (j & 1) * BC * SROW; };
        load_tile<BC, DH>(vbuf(0), vg, vrs, 0, N);
        if (ntiles > 1) load_tile<BC, DH>(kbuf(1), kg, krs, BC, N);
        cp_async_commit();
        float s[MT][NK][4];  // S_j: raw scores, then probabilities
        qk_tile<DH, MT>(s, qf, kbuf(0), lane);
        for (int j = 0; j + 1 < ntiles; j++) {
            const int k0 = j * BC;
            if (needs_mask(k0)) mask_tile<MT>(s, qs + q0 + wrow, k0, N, ps, pe, lane);
            cp_async_wait_all();  // K_{j+1}, V_j landed
            __syncthreads();      // ... for every thread; every warp is done with K_j, V_{j-1}
            load_tile<BC, DH>(vbuf(j + 1), vg, vrs, k0 + BC, N);
            if (j + 2 < ntiles) load_tile<BC, DH>(kbuf(j + 2), kg, krs, k0 + 2 * BC, N);
            cp_async_commit();
            float sn[MT][NK][4];  // S_{j+1}
            qk_tile<DH, MT>(sn, qf, kbuf(j + 1), lane);
            softmax_tile<DH, MT>(s, m, l, o, sl2);
            pv_tile<DH, MT>(o, s, vbuf(j), lane);
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NK; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[mt][nt][e] = sn[mt][nt][e];
        }
        const int jl = ntiles - 1, kl = jl * BC;
        if (needs_mask(kl)) mask_tile<MT>(s, qs + q0 + wrow, kl, N, ps, pe, lane);
        cp_async_wait_all();  // V_last landed
        __syncthreads();
        softmax_tile<DH, MT>(s, m, l, o, sl2);
        pv_tile<DH, MT>(o, s, vbuf(jl), lane);
    }

    // Normalise, stage this warp's rows in its own part of sQ (only it read them), store
    // 16-byte chunks of whole rows.
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float sum = l[mt][r];
            sum += __shfl_xor_sync(FULL_MASK, sum, 1);
            sum += __shfl_xor_sync(FULL_MASK, sum, 2);
            const float inv = 1.0f / sum;
            const int row = wrow + mt * 16 + g + r * 8;
#pragma unroll
            for (int dt = 0; dt < ND; dt++)
                *reinterpret_cast<uint32_t*>(sQ + row * SROW + dt * 8 + 2 * t) =
                    pack(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
            const int qi = q0 + row;
            if (t == 0 && qi < nq) lse[(size_t)bh * nq + qi] = m[mt][r] * scale + logf(sum);
        }
    __syncwarp();
    // This block's head in its image's output rows, from a fresh read of the block index:
    // keeping the image index live through the loop cost registers that ptxas spilled.
    const int bh_again = block_y_again();
    bf16* og = p.o + (bh_again / p.h) * p.o_batch_stride + (bh_again % p.h) * p.o_head_stride;
    const size_t ors = p.o_row_stride;
    constexpr int CH = DH / 8;
#pragma unroll
    for (int i = 0; i < 16 * MT * CH / 32; i++) {
        const int c = lane + 32 * i;
        const int r = c / CH, k = c % CH;
        const int qi = q0 + wrow + r;
        if (qi < nq)
            *reinterpret_cast<uint4*>(og + (size_t)qi * ors + k * 8) =
                *reinterpret_cast<const uint4*>(sQ + (wrow + r) * SROW + k * 8);
    }
}

// ------------------------------------------------------------------------------ backward
// dvec[b, h, i] = sum_d dO[b, i, h, d] O[b, i, h, d] over the nq query rows; zeroes dq_acc
// ([B, nq, h*dh] contiguous) unless it is null. Each thread takes 16-byte chunks of 8 elements; the G
// lanes of one (b, i, h) row (G the largest power of two dividing DH/8: 4 at dh 32, 8 at 64,
// 2 at 80, 16 at 128) take its chunks in turn, so a warp reads 32 consecutive chunks at a time,
// and sum by shuffles. Whole warps step together so every shuffle has all 32 lanes.
template <int DH>
__device__ __forceinline__ void bwd_pre(const AttnParams& p) {
    const int N = p.nq, H = p.h;
    float* __restrict__ dq_acc = p.dq_acc;
    constexpr int CH = DH / 8;     // chunks per row
    constexpr int G = CH & -CH;    // lanes per row
    constexpr int PER = CH / G;    // chunks per lane
    static_assert(G <= 32 && 32 % G == 0, "lanes per row must divide the warp");
    const uint64_t total = (uint64_t)p.b * N * H * G;
    const int lane = threadIdx.x & 31;
    for (uint64_t base = global_thread() - lane; base < total; base += grid_threads()) {
        const uint64_t c = base + lane;
        const bool ok = c < total;  // the same for all lanes of a row: total % G == 0
        const uint64_t row = c / G;  // (b * N + i) * H + h
        const int hh = (int)(row % H);
        const uint64_t bi = row / H;
        const int i = (int)(bi % N);
        const int64_t b = (int64_t)(bi / N);
        float acc = 0.0f;
        if (ok) {
            const bf16* o = p.o + b * p.o_batch_stride + i * p.o_row_stride + hh * p.o_head_stride;
            const bf16* dout = p.dout + b * p.do_batch_stride + i * p.do_row_stride + hh * p.do_head_stride;
#pragma unroll
            for (int j = 0; j < PER; j++) {
                const int kc = (int)(c % G) + j * G;  // chunk of the row
                const uint64_t chunk = row * CH + kc;
                float x[8], y[8];
                load_bf16<8>(o + kc * 8, x);
                load_bf16<8>(dout + kc * 8, y);
#pragma unroll
                for (int e = 0; e < 8; e++) acc = fmaf(x[e], y[e], acc);
                if (dq_acc != nullptr) {  // null for the split backward (no dQ sums)
                    float4* z = reinterpret_cast<float4*>(dq_acc + chunk * 8);
                    z[0] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    z[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                }
            }
        }
#pragma unroll
        for (int o = G / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, o);
        if (ok && lane % G == 0) p.dvec[(b * H + hh) * N + i] = acc;
    }
}

// One block of KW warps per BC = 16 KW keys of one (b, h); warp w owns keys w*16 .. w*16+15
// of the block. Per step over BQ queries (P^T, dP^T, dS^T are [keys x queries] in registers):
//   S^T = K Q^T, P^T = exp(scale S^T - lse), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T (dP^T - D), dK += dS^T Q, dS^T -> shared, dQ_part = dS K -> atomics.
// SPLIT: dK and dV only (no dS^T, no dQ, no atomics; bwd_dq computes dQ in its own pass), Q
// and dO double-buffered so the next step's load has a whole step to land, one barrier per
// step; the block also writes the zero dQ rows of its keys outside the query range.
template <int DH, int BQ, int KW, bool SPLIT>
__device__ __forceinline__ void bwd(const AttnParams& p) {
    const int N = p.n, ps = p.ps, pe = p.pe, qs = p.qs, nq = p.nq;
    const float scale = p.scale;
    const float* __restrict__ lse = p.lse;
    const float* __restrict__ dvec = p.dvec;
    float* __restrict__ dq_acc = p.dq_acc;
    constexpr int BC = 16 * KW, NT = 32 * KW;  // keys and threads per block (KW warps)
    constexpr int SROW = DH + 8;
    constexpr int PROW = BQ + 8;
    constexpr int KD = DH / 16;
    constexpr int ND = DH / 8;
    constexpr int NQ = BQ / 8;  // n-tiles over the queries of a step
    // dQ_part [BQ x DH] of a step: MQ m-tiles of 16 queries, each shared by WPM warps that
    // take its ND / 2 pairs of head-dim n-tiles in turn (at most NPAIR each).
    constexpr int MQ = BQ / 16, WPM = KW / MQ, NPAIR = (ND / 2 + WPM - 1) / WPM;
    static_assert(KW % MQ == 0, "dQ m-tiles do not split over the warps");
    constexpr int NB = SPLIT ? 2 : 1;  // buffers of a step's inputs
    bf16* sK = reinterpret_cast<bf16*>(dyn_smem());  // [BC][SROW]
    bf16* sV = sK + BC * SROW;                        // [BC][SROW]
    bf16* sQb = sV + BC * SROW;                       // NB x [BQ][SROW]
    bf16* sdOb = sQb + NB * BQ * SROW;                // NB x [BQ][SROW]
    bf16* sdS = sdOb + NB * BQ * SROW;                // dS^T [key][query], [BC][PROW] (not SPLIT)
    float* sLb = reinterpret_cast<float*>(sdS + (SPLIT ? 0 : BC * PROW));  // lse * log2(e), NB x [BQ]
    float* sDb = sLb + NB * BQ;                                             // D, NB x [BQ]

    const HeadView hv = head_view(p);
    const int bh = hv.bh, b = hv.b, hh = hv.hh, D = p.h * DH;
    const size_t qrs = p.q_row_stride, krs = p.k_row_stride, vrs = p.v_row_stride, dors = p.do_row_stride;
    const bf16 *qg = hv.q, *kg = hv.k, *vg = hv.v;
    const bf16* dog = p.dout + b * p.do_batch_stride + hh * p.do_head_stride;
    const int k0 = blockIdx.x * BC;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wk = warp * 16;  // this warp's first key inside the block

    // Query rows q0 .. q0 + BQ of step `q0 / BQ`: Q, dO by cp.async (not committed), lse and D
    // into registers (stored into sL, sD by the caller once nobody reads them).
    auto fetch_step = [&](int q0, float& l_next, float& d_next) {
        const int buf = (q0 / BQ) % NB;
        load_tile<BQ, DH, NT>(sQb + buf * BQ * SROW, qg, qrs, qs + q0, qs + nq);
        load_tile<BQ, DH, NT>(sdOb + buf * BQ * SROW, dog, dors, q0, nq);
        if (threadIdx.x < BQ) {
            const int qi = q0 + threadIdx.x;
            l_next = qi < nq ? lse[(size_t)bh * nq + qi] * LOG2E : 0.0f;
            d_next = qi < nq ? dvec[(size_t)bh * nq + qi] : 0.0f;
        }
    };
    float l_next = 0.0f, d_next = 0.0f;
    load_tile<BC, DH, NT>(sK, kg, krs, k0, N);
    load_tile<BC, DH, NT>(sV, vg, vrs, k0, N);
    if (nq > 0) fetch_step(0, l_next, d_next);
    cp_async_commit();
    if (threadIdx.x < BQ) {
        sLb[threadIdx.x] = l_next;
        sDb[threadIdx.x] = d_next;
    }
    cp_async_wait_all();
    __syncthreads();

    // K stays in registers for the whole block; V's fragments are re-read from shared memory
    // each step (keeping both would spill).
    const int a_off = (wk + (lane & 15)) * SROW + (lane >> 4) * 8;
    uint32_t kf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; kk++) ldsm_x4(kf[kk], smem_u32(sK + a_off + kk * 16));
    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int dt = 0; dt < ND; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dt][e] = dv[dt][e] = 0.0f;

    const float sl2 = scale * LOG2E;
    const bool k_prompt = ps < pe && k0 < pe && k0 + BC > ps;
    const int nsteps = (nq + BQ - 1) / BQ;

    // Each step starts with its Q, dO, lse, D in shared memory and visible to all threads.
    for (int step = 0; step < nsteps; step++) {
        const int q0 = step * BQ;  // query row (of nq); token qs + q0
        const bool next = step + 1 < nsteps;
        const int buf = step % NB;
        const bf16* sQ = sQb + buf * BQ * SROW;
        const bf16* sdO = sdOb + buf * BQ * SROW;
        const float* sL = sLb + buf * BQ;
        const float* sD = sDb + buf * BQ;
        if constexpr (SPLIT) {
            // The other buffers were last read in the previous step, before its final barrier.
            if (next) {
                fetch_step(q0 + BQ, l_next, d_next);
                cp_async_commit();
            }
        }

        // S^T = K Q^T and dP^T = V dO^T: B operands are Q, dO stored [query][d] = [n][k].
        float s[NQ][4], dp[NQ][4];
#pragma unroll
        for (int nt = 0; nt < NQ; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            uint32_t vf[4];
            ldsm_x4(vf, smem_u32(sV + a_off + kk * 16));
#pragma unroll
            for (int np = 0; np < NQ / 2; np++) {
                const int off = (np * 16 + (lane & 7) + (lane >> 4) * 8) * SROW + kk * 16 + ((lane >> 3) & 1) * 8;
                uint32_t bq[4], bo[4];
                ldsm_x4(bq, smem_u32(sQ + off));
                ldsm_x4(bo, smem_u32(sdO + off));
                mma(s[2 * np], kf[kk], bq[0], bq[1]);
                mma(s[2 * np + 1], kf[kk], bq[2], bq[3]);
                mma(dp[2 * np], vf, bo[0], bo[1]);
                mma(dp[2 * np + 1], vf, bo[2], bo[3]);
            }
        }

        // P^T and dS^T. Element e of n-tile nt: key wk + g + (e>>1)*8, query nt*8 + 2t + (e&1).
        const bool masked = q0 + BQ > nq || k0 + BC > N || (k_prompt && qs + q0 < pe && qs + q0 + BQ > ps);
#pragma unroll
        for (int nt = 0; nt < NQ; nt++) {
            const float2 lq = *reinterpret_cast<const float2*>(sL + nt * 8 + 2 * t);
            const float2 dq = *reinterpret_cast<const float2*>(sD + nt * 8 + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = exp2_approx(fmaf(s[nt][e], sl2, -((e & 1) ? lq.y : lq.x)));
                if (masked) {
                    const int kj = k0 + wk + g + (e >> 1) * 8;
                    const int qi = q0 + nt * 8 + 2 * t + (e & 1);
                    p = (qi < nq) & visible(qs + qi, kj, N, ps, pe) ? p : 0.0f;
                }
                s[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - ((e & 1) ? dq.y : dq.x));
            }
        }

        // dV += P^T dO and dK += dS^T Q: B operands dO, Q stored [query][d] = [k][n] (.trans).
#pragma unroll
        for (int kc = 0; kc < BQ / 16; kc++) {
            uint32_t pa[4], da[4];
            acc_to_a(pa, s[2 * kc], s[2 * kc + 1]);
            acc_to_a(da, dp[2 * kc], dp[2 * kc + 1]);
#pragma unroll
            for (int np = 0; np < ND / 2; np++) {
                const int off = (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + np * 16 + (lane >> 4) * 8;
                uint32_t bo[4], bq[4];
                ldsm_x4_t(bo, smem_u32(sdO + off));
                ldsm_x4_t(bq, smem_u32(sQ + off));
                mma(dv[2 * np], pa, bo[0], bo[1]);
                mma(dv[2 * np + 1], pa, bo[2], bo[3]);
                mma(dk[2 * np], da, bq[0], bq[1]);
                mma(dk[2 * np + 1], da, bq[2], bq[3]);
            }
            if constexpr (!SPLIT) {
                // dS^T rows (keys) g and g+8 of this warp, queries of n-tiles 2kc, 2kc+1.
                bf16* d0 = sdS + (wk + g) * PROW + kc * 16 + 2 * t;
                *reinterpret_cast<uint32_t*>(d0) = da[0];
                *reinterpret_cast<uint32_t*>(d0 + 8 * PROW) = da[1];
                *reinterpret_cast<uint32_t*>(d0 + 8) = da[2];
                *reinterpret_cast<uint32_t*>(d0 + 8 * PROW + 8) = da[3];
            }
        }
        if constexpr (SPLIT) {
            if (next && threadIdx.x < BQ) {
                sLb[(buf ^ 1) * BQ + threadIdx.x] = l_next;
                sDb[(buf ^ 1) * BQ + threadIdx.x] = d_next;
            }
            cp_async_wait_all();
            __syncthreads();  // the next step's inputs visible; every warp done with this step's
            continue;
        }
        __syncthreads();  // dS^T of every warp in shared memory; every warp done with sQ, sdO, sL, sD
        // The next step's inputs load while dQ is computed.
        if (next) {
            fetch_step(q0 + BQ, l_next, d_next);
            cp_async_commit();
        }

        // dQ_part [BQ x DH] = dS [query][key] K [key][d]; warp w takes m-tile mq (queries
        // mq*16 .. +15) and the head-dim n-tile pairs part, part + WPM, ... (< ND / 2).
        // A = dS stored transposed ([key][query]): ldmatrix .trans; B = K stored [k][n]: .trans.
        const int mq = warp % MQ, part = warp / MQ;
        auto pair_of = [&](int np) { return part + np * WPM; };
        auto has_pair = [&](int np) { return (ND / 2) % WPM == 0 || pair_of(np) < ND / 2; };  // warp-uniform
        float dqp[2 * NPAIR][4];
#pragma unroll
        for (int dt = 0; dt < 2 * NPAIR; dt++)
#pragma unroll
            for (int e = 0; e < 4; e++) dqp[dt][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < BC / 16; kc++) {
            uint32_t a[4];
            const int mi = lane >> 3;
            ldsm_x4_t(a, smem_u32(sdS + (kc * 16 + (lane & 7) + (mi >> 1) * 8) * PROW + mq * 16 + (mi & 1) * 8));
#pragma unroll
            for (int np = 0; np < NPAIR; np++) {
                if (!has_pair(np)) break;
                uint32_t bk[4];
                ldsm_x4_t(bk, smem_u32(sK + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW +
                                       pair_of(np) * 16 + (lane >> 4) * 8));
                mma(dqp[2 * np], a, bk[0], bk[1]);
                mma(dqp[2 * np + 1], a, bk[2], bk[3]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int qi = q0 + mq * 16 + g + r * 8;
            if (qi < nq) {
                float* dst = dq_acc + ((size_t)b * nq + qi) * D + hh * DH + 2 * t;
#pragma unroll
                for (int np = 0; np < NPAIR; np++) {
                    if (!has_pair(np)) break;
#pragma unroll
                    for (int c = 0; c < 2; c++)
                        add2(dst + (pair_of(np) * 2 + c) * 8, dqp[2 * np + c][2 * r], dqp[2 * np + c][2 * r + 1]);
                }
            }
        }
        if (next && threadIdx.x < BQ) {
            sLb[threadIdx.x] = l_next;
            sDb[threadIdx.x] = d_next;
        }
        cp_async_wait_all();
        __syncthreads();  // the next step's inputs visible; every warp done with sdS
    }

    // dK (scaled) and dV: stage this warp's 16 rows in sK / sV (after every warp's last reads
    // of sK), then 16-byte stores of whole rows into dqkv's K and V slots.
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = wk + g + r * 8;
#pragma unroll
        for (int dt = 0; dt < ND; dt++) {
            *reinterpret_cast<uint32_t*>(sK + row * SROW + dt * 8 + 2 * t) =
                pack(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
            *reinterpret_cast<uint32_t*>(sV + row * SROW + dt * 8 + 2 * t) = pack(dv[dt][2 * r], dv[dt][2 * r + 1]);
        }
    }
    __syncwarp();
    constexpr int CH = DH / 8;
    bf16* dkg = p.dk + b * p.dk_batch_stride + hh * p.dk_head_stride;
    bf16* dvg = p.dv + b * p.dv_batch_stride + hh * p.dv_head_stride;
#pragma unroll
    for (int i = 0; i < 16 * CH / 32; i++) {
        const int c = lane + 32 * i;
        const int r = c / CH, k = c % CH;
        const int kj = k0 + wk + r;
        if (kj < N) {
            *reinterpret_cast<uint4*>(dkg + kj * p.dk_row_stride + k * 8) =
                *reinterpret_cast<const uint4*>(sK + (wk + r) * SROW + k * 8);
            *reinterpret_cast<uint4*>(dvg + kj * p.dv_row_stride + k * 8) =
                *reinterpret_cast<const uint4*>(sV + (wk + r) * SROW + k * 8);
            // SPLIT: the dQ rows of keys outside the query range are zero (bwd_dq writes the rest).
            if (SPLIT && (kj < qs || kj >= qs + nq))
                *reinterpret_cast<uint4*>(p.dq + b * p.dq_batch_stride + kj * p.dq_row_stride + hh * p.dq_head_stride + k * 8) =
                    make_uint4(0, 0, 0, 0);
        }
    }
}

// dQ of the split backward, query-stationary like the forward: a block per BR = 16 MT WARPS
// query rows of one (b, h), the key tiles streamed through double buffers (the next tile loads
// during this one, one barrier per tile). Per tile: S = Q K^T, dP = dO V^T (Q, dO fragments in
// registers), P = exp(scale S - lse), dS = P (dP - D), dQ += dS K; dQ (scaled) written once, in
// bf16, into dqkv's Q slot. Two more products than dQ by atomics in bwd, and no fp32
// scratch, atomics or conversion pass: deterministic.
template <int DH, int MT>
__device__ __forceinline__ void bwd_dq(const AttnParams& p) {
    const int N = p.n, ps = p.ps, pe = p.pe, qs = p.qs, nq = p.nq;
    const float scale = p.scale;
    const float* __restrict__ lse = p.lse;
    const float* __restrict__ dvec = p.dvec;
    constexpr int BR = 16 * MT * WARPS;
    constexpr int SROW = DH + 8, KD = DH / 16, ND = DH / 8, NK = BC / 8;
    bf16* sQ = reinterpret_cast<bf16*>(dyn_smem());  // [BR][SROW]
    bf16* sdO = sQ + BR * SROW;                       // [BR][SROW]
    bf16* sK = sdO + BR * SROW;                       // 2 x [BC][SROW]
    bf16* sV = sK + 2 * BC * SROW;                    // 2 x [BC][SROW]
    auto kbuf = [&](int j) { return sK + (j & 1) * BC * SROW; };
    auto vbuf = [&](int j) { return sV + (j & 1) * BC * SROW; };

    const HeadView hv = head_view(p);
    const int bh = hv.bh, b = hv.b, hh = hv.hh;
    const size_t qrs = p.q_row_stride, krs = p.k_row_stride, vrs = p.v_row_stride;
    const bf16 *qg = hv.q, *kg = hv.k, *vg = hv.v;
    const bf16* dog = p.dout + b * p.do_batch_stride + hh * p.do_head_stride;
    const int q0 = blockIdx.x * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wrow = warp * 16 * MT;

    load_tile<BR, DH>(sQ, qg, qrs, qs + q0, qs + nq);
    load_tile<BR, DH>(sdO, dog, p.do_row_stride, q0, nq);
    load_tile<BC, DH>(kbuf(0), kg, krs, 0, N);
    load_tile<BC, DH>(vbuf(0), vg, vrs, 0, N);
    cp_async_commit();

    // lse (log2 units) and D of this lane's rows: g and g + 8 of each m-tile (0 past nq, where
    // Q and dO are zero, so those rows' dS is 0).
    float l2[MT][2], dd[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int qi = q0 + wrow + mt * 16 + g + r * 8;
            l2[mt][r] = qi < nq ? lse[(size_t)bh * nq + qi] * LOG2E : 0.0f;
            dd[mt][r] = qi < nq ? dvec[(size_t)bh * nq + qi] : 0.0f;
        }
    cp_async_wait_all();
    __syncthreads();

    uint32_t qf[MT][KD][4], dof[MT][KD][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            const int off = (wrow + mt * 16 + (lane & 15)) * SROW + kk * 16 + (lane >> 4) * 8;
            ldsm_x4(qf[mt][kk], smem_u32(sQ + off));
            ldsm_x4(dof[mt][kk], smem_u32(sdO + off));
        }
    float dq[MT][ND][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int dt = 0; dt < ND; dt++)
#pragma unroll
            for (int e = 0; e < 4; e++) dq[mt][dt][e] = 0.0f;

    const float sl2 = scale * LOG2E;
    const bool q_prompt = ps < pe && qs + q0 < pe && qs + q0 + BR > ps;
    const int ntiles = (N + BC - 1) / BC;
    for (int j = 0; j < ntiles; j++) {
        const int k0 = j * BC;
        if (j > 0) {
            cp_async_wait_all();  // K_j, V_j landed
            __syncthreads();      // ... for every thread; every warp is done with tile j - 1
        }
        if (j + 1 < ntiles) {
            load_tile<BC, DH>(kbuf(j + 1), kg, krs, k0 + BC, N);
            load_tile<BC, DH>(vbuf(j + 1), vg, vrs, k0 + BC, N);
            cp_async_commit();
        }
        float s[MT][NK][4], dp[MT][NK][4];
        qk_tile<DH, MT>(s, qf, kbuf(j), lane);
        qk_tile<DH, MT>(dp, dof, vbuf(j), lane);
        if (k0 + BC > N || (q_prompt && k0 < pe && k0 + BC > ps)) mask_tile<MT>(s, qs + q0 + wrow, k0, N, ps, pe, lane);
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < NK; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e >> 1;
                    const float p = exp2_approx(fmaf(s[mt][nt][e], sl2, -l2[mt][r]));
                    s[mt][nt][e] = p * (dp[mt][nt][e] - dd[mt][r]);  // dS
                }
        pv_tile<DH, MT>(dq, s, kbuf(j), lane);  // dQ += dS K (K stored [key][d], as V)
    }

    // Scale, stage this warp's rows in its own part of sQ (only it read them), 16-byte stores.
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int row = wrow + mt * 16 + g + r * 8;
#pragma unroll
            for (int dt = 0; dt < ND; dt++)
                *reinterpret_cast<uint32_t*>(sQ + row * SROW + dt * 8 + 2 * t) =
                    pack(dq[mt][dt][2 * r] * scale, dq[mt][dt][2 * r + 1] * scale);
        }
    __syncwarp();
    const int bh_again = block_y_again();
    bf16* dqg = p.dq + (bh_again / p.h) * p.dq_batch_stride + (bh_again % p.h) * p.dq_head_stride;
    constexpr int CH = DH / 8;
#pragma unroll
    for (int i = 0; i < 16 * MT * CH / 32; i++) {
        const int c = lane + 32 * i;
        const int r = c / CH, kq = c % CH;
        const int qi = q0 + wrow + r;
        if (qi < nq)
            *reinterpret_cast<uint4*>(dqg + (size_t)(qs + qi) * p.dq_row_stride + kq * 8) =
                *reinterpret_cast<const uint4*>(sQ + (wrow + r) * SROW + kq * 8);
    }
}

}  // namespace attn

// The compiled kernels, from the tile tables of src/contract.rs (contract.cuh's X-macros): per
// head dim the row sums (ATTN_HEAD_DIMS), one or more tile shapes of the forward (head dim, MT,
// software-pipelined, minimum blocks per SM, name) and of the backward (head dim, BQ, warps,
// split: dK and dV only, name), and the split backwards' dQ passes; the launcher sizes their
// dynamic shared memory from the same tables.
#define ATTN_FWD_KERNEL(DH, MT, PIPE, MINB, NAME) \
    extern "C" __global__ void __launch_bounds__(attn::THREADS, MINB) NAME(const AttnParams p) { attn::fwd<DH, MT, PIPE>(p); }
#define ATTN_PRE_KERNEL(DH) \
    extern "C" __global__ void attn_bwd_pre_d##DH(const AttnParams p) { attn::bwd_pre<DH>(p); }
#define ATTN_BWD_KERNEL(DH, BQ, KW, SPLIT, NAME) \
    extern "C" __global__ void __launch_bounds__(32 * KW) NAME(const AttnParams p) { attn::bwd<DH, BQ, KW, SPLIT>(p); }
#define ATTN_BWD_DQ_KERNEL(DH, MT, NAME) \
    extern "C" __global__ void __launch_bounds__(attn::THREADS) NAME(const AttnParams p) { attn::bwd_dq<DH, MT>(p); }
ATTN_HEAD_DIMS(ATTN_PRE_KERNEL)
ATTN_FWD_CONFIGS(ATTN_FWD_KERNEL)
ATTN_BWD_CONFIGS(ATTN_BWD_KERNEL)
ATTN_BWD_DQ_CONFIGS(ATTN_BWD_DQ_KERNEL)

// dq[b, i, h, :] = scale * dq_acc[b, i - qs, h*dh:] for query tokens i in [qs, qs + nq), zero
// for the other tokens; over the B*N token rows in chunks of 8 (dh % 8 == 0).
extern "C" __global__ void attn_bwd_dq_convert(const AttnParams p) {
    const uint32_t N = p.n, qs = p.qs, nq = p.nq, D = p.h * p.dh;
    const uint32_t ch = D / 8;
    const uint64_t rows = (uint64_t)p.b * N;
    for (uint64_t c = global_thread(); c < rows * ch; c += grid_threads()) {
        const uint64_t r = c / ch, k = c % ch;
        const uint32_t i = (uint32_t)(r % N);
        const int64_t b = (int64_t)(r / N);
        float v[8];
        if (i >= qs && i < qs + nq) {
            load_f32<8>(p.dq_acc + ((r / N) * nq + (i - qs)) * D + k * 8, v);
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] *= p.scale;
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = 0.0f;
        }
        const uint32_t col = (uint32_t)k * 8, hh = col / p.dh;
        store_bf16<8>(p.dq + b * p.dq_batch_stride + i * p.dq_row_stride + hh * p.dq_head_stride + (col - hh * p.dh), v);
    }
}

// ---------------------------------------------------------------- unfused peer (benchmarks)
// q, k, v [B, h, N, dh] contiguous from qkv [B, N, 3, h, dh]; one thread per element.
extern "C" __global__ void attn_split_heads(const bf16* __restrict__ qkv, bf16* __restrict__ q, bf16* __restrict__ k,
                                            bf16* __restrict__ v, uint32_t B, uint32_t N, uint32_t H, uint32_t dh) {
    const uint64_t total = (uint64_t)B * H * N * dh;
    for (uint64_t x = global_thread(); x < total; x += grid_threads()) {
        const uint32_t d = x % dh;
        const uint64_t rest = x / dh;
        const uint32_t i = rest % N;
        const uint64_t bh = rest / N;
        const uint32_t hh = bh % H;
        const uint64_t b = bh / H;
        const uint64_t src = ((b * N + i) * 3 * H + hh) * dh + d;
        const uint64_t D = (uint64_t)H * dh;
        q[x] = qkv[src];
        k[x] = qkv[src + D];
        v[x] = qkv[src + 2 * D];
    }
}

// In place over `rows` rows of n raw scores (row r is query r % n): scale, prompt mask,
// softmax. One warp per row, three passes over the row (it stays in L1/L2).
extern "C" __global__ void attn_softmax_rows_bf16(bf16* __restrict__ s, uint64_t rows, uint32_t n, int ps, int pe,
                                                  float scale) {
    const int lane = threadIdx.x & 31;
    const uint64_t warps = grid_threads() >> 5;
    for (uint64_t row = global_thread() >> 5; row < rows; row += warps) {
        bf16* x = s + row * n;
        const int i = (int)(row % n);
        float mx = -INFINITY;
        for (uint32_t j = lane; j < n; j += 32)
            if (attn::allowed(i, (int)j, ps, pe)) mx = fmaxf(mx, __bfloat162float(x[j]) * scale);
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 16));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
        float sum = 0.0f;
        for (uint32_t j = lane; j < n; j += 32)
            if (attn::allowed(i, (int)j, ps, pe)) sum += __expf(__bfloat162float(x[j]) * scale - mx);
        const float inv = 1.0f / warp_sum(sum);
        for (uint32_t j = lane; j < n; j += 32) {
            const float p = attn::allowed(i, (int)j, ps, pe) ? __expf(__bfloat162float(x[j]) * scale - mx) * inv : 0.0f;
            x[j] = __float2bfloat16_rn(p);
        }
    }
}

// In place: dp <- scale * p * (dp - rowsum(p * dp)) (the softmax backward, scaled for the
// score gradient). One warp per row.
extern "C" __global__ void attn_softmax_bwd_rows_bf16(const bf16* __restrict__ p, bf16* __restrict__ dp,
                                                      uint64_t rows, uint32_t n, float scale) {
    const int lane = threadIdx.x & 31;
    const uint64_t warps = grid_threads() >> 5;
    for (uint64_t row = global_thread() >> 5; row < rows; row += warps) {
        const bf16* pr = p + row * n;
        bf16* dr = dp + row * n;
        float acc = 0.0f;
        for (uint32_t j = lane; j < n; j += 32) acc += __bfloat162float(pr[j]) * __bfloat162float(dr[j]);
        const float di = warp_sum(acc);
        for (uint32_t j = lane; j < n; j += 32)
            dr[j] = __float2bfloat16_rn(scale * __bfloat162float(pr[j]) * (__bfloat162float(dr[j]) - di));
    }
}

// ---- plain fp32 attention (any head dim) ------------------------------------------------------
// For head dims the fused kernels above do not cover (launchers: plain_forward, plain_backward in
// src/ops/attention/cuda.rs). fp32 storage and math, no tensor cores.
// One block per (query, image*head); the scores of the row live in shared memory (N floats,
// twice in the backward). Mask as AttnShape::allowed: a prompt query skips the other prompts.

__device__ float plain_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int w = 0; w < nwarps; ++w) r = fmaxf(r, scratch[w]);
    return r;
}

__device__ float plain_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < nwarps; ++w) r += scratch[w];
    return r;
}

// qkv [B, N, 3, h, dh]; out [B, Nq, D]; lse [B, h, Nq] (PlainAttnParams: src/contract.rs).
extern "C" __global__ void attn_simple_fwd(const PlainAttnParams p) {
    const float* __restrict__ qkv = p.qkv;
    float* __restrict__ out = p.out;
    float* __restrict__ lse = p.lse;
    const int n = p.n, h = p.h, dh = p.dh, ps = p.ps, pe = p.pe, q0 = p.q0, nq = p.nq;
    const float scale = p.scale;
    float* s = reinterpret_cast<float*>(dyn_smem());  // [n] scores, then 32 reduction slots
    float* red = s + n;
    const int qi = blockIdx.x, bh = blockIdx.y, b = bh / h, hd = bh % h, d = h * dh, i = q0 + qi;
    const float* base = qkv + (uint64_t)b * n * 3 * d + hd * dh;
    const float* q = base + (uint64_t)i * 3 * d;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = -INFINITY;
        if (attn::allowed(i, j, ps, pe)) {
            const float* k = base + (uint64_t)j * 3 * d + d;
            float acc = 0.f;
            for (int c = 0; c < dh; ++c) acc += q[c] * k[c];
            v = acc * scale;
        }
        s[j] = v;
        mx = fmaxf(mx, v);
    }
    mx = plain_block_max(mx, red);
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = __expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    sum = plain_block_sum(sum, red);
    const float inv = 1.f / sum;
    __syncthreads();
    for (int c = threadIdx.x; c < dh; c += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; ++j) acc += s[j] * base[(uint64_t)j * 3 * d + 2 * d + c];
        out[((uint64_t)b * nq + qi) * d + hd * dh + c] = acc * inv;
    }
    if (threadIdx.x == 0) lse[(uint64_t)bh * nq + qi] = mx + logf(sum);
}

// dqkv must be zero on entry (dK, dV are accumulated with atomics across queries).
extern "C" __global__ void attn_simple_bwd(const PlainAttnParams p) {
    const float* __restrict__ qkv = p.qkv;
    const float* __restrict__ out = p.out;
    const float* __restrict__ lse = p.lse;
    const float* __restrict__ dout = p.dout;
    float* __restrict__ dqkv = p.dqkv;
    const int n = p.n, h = p.h, dh = p.dh, ps = p.ps, pe = p.pe, q0 = p.q0, nq = p.nq;
    const float scale = p.scale;
    float* s = reinterpret_cast<float*>(dyn_smem());  // [n] probabilities, [n] dS, 32 reduction slots
    float* ds = s + n;
    float* red = ds + n;
    const int qi = blockIdx.x, bh = blockIdx.y, b = bh / h, hd = bh % h, d = h * dh, i = q0 + qi;
    const uint64_t img = (uint64_t)b * n * 3 * d + hd * dh;
    const float* base = qkv + img;
    float* dbase = dqkv + img;
    const float* q = base + (uint64_t)i * 3 * d;
    const float* go = dout + ((uint64_t)b * nq + qi) * d + hd * dh;
    const float* o = out + ((uint64_t)b * nq + qi) * d + hd * dh;
    const float l = lse[(uint64_t)bh * nq + qi];
    float dd = 0.f;
    for (int c = threadIdx.x; c < dh; c += blockDim.x) dd += go[c] * o[c];
    dd = plain_block_sum(dd, red);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float p = 0.f, g = 0.f;
        if (attn::allowed(i, j, ps, pe)) {
            const float* k = base + (uint64_t)j * 3 * d + d;
            const float* v = k + d;
            float acc = 0.f, dp = 0.f;
            for (int c = 0; c < dh; ++c) {
                acc += q[c] * k[c];
                dp += go[c] * v[c];
            }
            p = __expf(acc * scale - l);
            g = p * (dp - dd);
        }
        s[j] = p;
        ds[j] = g;
    }
    __syncthreads();
    // dQ row (this block owns it), dK and dV rows (shared across queries: atomics).
    for (int c = threadIdx.x; c < dh; c += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; ++j) acc += ds[j] * base[(uint64_t)j * 3 * d + d + c];
        dbase[(uint64_t)i * 3 * d + c] = acc * scale;
    }
    for (uint64_t t = threadIdx.x; t < (uint64_t)n * dh; t += blockDim.x) {
        int j = (int)(t / dh), c = (int)(t % dh);
        if (s[j] == 0.f && ds[j] == 0.f) continue;
        atomicAdd(dbase + (uint64_t)j * 3 * d + d + c, ds[j] * q[c] * scale);
        atomicAdd(dbase + (uint64_t)j * 3 * d + 2 * d + c, s[j] * go[c]);
    }
}
