// The three contractions of the MoE head (head.cu; docs/MODEL.md#gating-and-the-expert-mixture)
// on tensor cores: per token t, with the (e, k) pairs pointing at t (tok's inverse, increasing)
// as the pair index j,
//   moe_fwd_scores_mma:  q[b, j] = <G[grow(j)], Z[b, t]>        r[b, j] = <W[k(j)], a(Z)[b, t]>
//   moe_bwd_tokens_mma:  dZ[b, t] += sum_j dq[b, j] G[grow(j)]   da(Z)[b, t] += sum_j dr[b, j] W[k(j)]
//   moe_bwd_pairs_mma:   pair_rows[j] = sum_b coef[b, j] X[b, t]
// the same arguments, outputs and order of outputs as head.cu's moe_fwd_scores, moe_bwd_tokens
// and moe_bwd_pairs, which do them on fp32 CUDA cores. Why: at Objects365's shape (B 256, K 365,
// E 3, D 768) each of the forward's two products is 215 M multiply-adds and the backward's four
// are 860 M; on fp32 FMA that is at least 13 us and 26 us of an H100's arithmetic peak, over the
// 70%-of-copy-bandwidth budgets of 9 and 23 us (docs/PERF.md), and the fp32 forward reads each
// G and W row once per image from L1 (1.7 GB at that shape). As block GEMMs on mma.sync, every
// G, W element staged in shared memory serves 64 images and every Z element 64 pairs.
//
// Precision: Z, a(Z) and X are bf16 already (exact as mma operands). The fp32 operands (G, W,
// dq, dr) are split x = hi + lo, both bf16 (hi = bf16(x), lo = bf16(x - hi)), which keeps about
// 16 bits of x (relative error <= 2^-17); a product takes hi*hi + hi*lo + lo*hi (the lo*lo term,
// <= 2^-18, is dropped), accumulated in fp32 by the tensor cores (whose adds truncate, with
// few alignment bits: over D = 768, 48 k-steps of 2-3 mmas, expect up to ~2^-16 of the partial
// sums' magnitude). So a result is within ~2^-16 of the sum of |terms| of head.cu's fp32 dot
// product, not bf16-rounded; tests/ops/head.rs allows 1e-4. Every output element belongs to one
// block and is summed in a fixed order: deterministic, no atomics.
//
// Blocking (all three): a block of 4 warps computes a 64 x 64 tile of C = A B, a warp 32 x 32
// (2 x 4 mma tiles of 16 x 8), stepping 64 (forward, along D) or 32 along the contraction. Each step's operands are
// fetched from global memory into registers one step ahead (so their latency overlaps the
// previous step's products), then converted (split) into shared memory. A is stored [m][k],
// B either [n][k] (read with ldmatrix) or [k][n] (ldmatrix .trans); rows padded by 16 bytes so
// ldmatrix is conflict-free. Fragment layouts: see attention.cu.
//
// Launch shapes (src/ops/head/cuda.rs, HeadKernels::Mma): 128 threads, grids
//   moe_fwd_scores_mma  (tokens, ceil(B/64), 2 ceil(max_pairs/64)): z = pair tile * 2 + product
//                       (0: q from Z and G, 1: r from a(Z) and W).
//   moe_bwd_tokens_mma  (tokens, ceil(B/64), 2 ceil(D/64)): z = column tile * 2 + product
//                       (0: dZ from dq and G, 1: da(Z) from dr and W).
//   moe_bwd_pairs_mma   (tokens, ceil(max_pairs/64), ceil(D/64)).
// Shapes the launcher guarantees: D % 8 == 0, pointers 16-byte aligned, table entries in range.
#include "common.cuh"
#include "moe_params.cuh"
#include "ptx.cuh"

namespace moe_mma {

constexpr int BM = MMA_TILE, BN = MMA_TILE;
constexpr int WARPS = MMA_WARPS, THREADS = 32 * WARPS;
// Row stride (bf16) of a [rows][BK] stage: SK = BK + 8 (80 bytes at BK 32, 144 at 64), and of a
// [BK][BN] stage: BN + 8 (144 bytes). Odd multiples of 16 bytes: ldmatrix's 8 row addresses
// fall in 8 distinct 16-byte bank groups.
constexpr int SN = BN + 8;
constexpr uint32_t NO_ROW = 0xffffffffu;

// x = hi + lo (both bf16, split_bf16x2), four at a time into 8-byte-aligned shared memory.
__device__ __forceinline__ void split4(const float4& v, bf16* hi, bf16* lo) {
    uint32_t h[2], l[2];
    split_bf16x2(v.x, v.y, h[0], l[0]);
    split_bf16x2(v.z, v.w, h[1], l[1]);
    *reinterpret_cast<uint2*>(hi) = make_uint2(h[0], h[1]);
    *reinterpret_cast<uint2*>(lo) = make_uint2(l[0], l[1]);
}
__device__ __forceinline__ void split1(float x, bf16* hi, bf16* lo) {
    const bf16 h = __float2bfloat16_rn(x);
    *hi = h;
    *lo = __float2bfloat16_rn(x - __bfloat162float(h));
}

// acc += A B over one step of BK staged in shared memory. Warp w owns rows 32 (w >> 1) .. + 32 and
// columns 32 (w & 1) .. + 32 of the tile: acc[mt][nt][e] is row 32 (w >> 1) + 16 mt + g + 8 (e >> 1),
// column 32 (w & 1) + 8 nt + 2 t + (e & 1). Terms: hi*hi, then hi*lo (B_LO), then lo*hi (A_LO).
template <int BK, bool A_LO, bool B_LO, bool B_KN>
__device__ __forceinline__ void step_mma(float (&acc)[2][4][4], const bf16* a_hi, const bf16* a_lo, const bf16* b_hi,
                                         const bf16* b_lo, int lane, int warp) {
    constexpr int SK = BK + 8;
    const int wm = warp >> 1, wn = warp & 1;
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
        uint32_t ah[2][4], al[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            const int off = (wm * 32 + mt * 16 + (lane & 15)) * SK + kk * 16 + (lane >> 4) * 8;
            ldsm_x4(ah[mt], smem_u32(a_hi + off));
            if (A_LO) ldsm_x4(al[mt], smem_u32(a_lo + off));
        }
#pragma unroll
        for (int np = 0; np < 2; np++) {
            uint32_t bh[4], bl[4];
            if (B_KN) {
                const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SN + wn * 32 + np * 16 + (lane >> 4) * 8;
                ldsm_x4_t(bh, smem_u32(b_hi + off));
                if (B_LO) ldsm_x4_t(bl, smem_u32(b_lo + off));
            } else {
                const int off = (wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8) * SK + kk * 16 + ((lane >> 3) & 1) * 8;
                ldsm_x4(bh, smem_u32(b_hi + off));
                if (B_LO) ldsm_x4(bl, smem_u32(b_lo + off));
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    float(&c)[4] = acc[mt][2 * np + h];
                    mma(c, ah[mt], bh[2 * h], bh[2 * h + 1]);
                    if (B_LO) mma(c, ah[mt], bl[2 * h], bl[2 * h + 1]);
                    if (A_LO) mma(c, al[mt], bh[2 * h], bh[2 * h + 1]);
                }
        }
    }
}

// The block's GEMM over a contraction of length `kdim` in steps of L::BK: the loader L fetches
// step k0's operands into its registers (fetch) and writes them, split, into the stages (store).
template <bool A_LO, bool B_LO, bool B_KN, class L>
__device__ __forceinline__ void block_gemm(L& ld, uint32_t kdim, float (&acc)[2][4][4]) {
    constexpr int BK = L::BK, SK = BK + 8;
    constexpr int BROWS = B_KN ? BK : BN, BSTRIDE = B_KN ? SN : SK;
    __shared__ __align__(16) bf16 sa[A_LO ? 2 : 1][BM * SK];
    __shared__ __align__(16) bf16 sb[B_LO ? 2 : 1][BROWS * BSTRIDE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mt][nt][e] = 0.0f;
    bf16* a_lo = sa[A_LO ? 1 : 0];
    bf16* b_lo = sb[B_LO ? 1 : 0];
    ld.fetch(0);
    for (uint32_t k0 = 0; k0 < kdim; k0 += BK) {
        ld.store(sa[0], a_lo, sb[0], b_lo);
        __syncthreads();
        if (k0 + BK < kdim) ld.fetch(k0 + BK);
        step_mma<BK, A_LO, B_LO, B_KN>(acc, sa[0], a_lo, sb[0], b_lo, lane, warp);
        __syncthreads();  // the stages are rewritten by the next step
    }
}

// Calls f(m, n, v0, v1) for each adjacent pair of the warp's accumulators: tile row m, columns
// n and n + 1 (n even).
template <class F>
__device__ __forceinline__ void for_acc_pairs(const float (&acc)[2][4][4], F f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++)
                f((warp >> 1) * 32 + mt * 16 + g + 8 * h, (warp & 1) * 32 + nt * 8 + 2 * t, acc[mt][nt][2 * h],
                  acc[mt][nt][2 * h + 1]);
}

// ---- forward: A = X [image][d] (bf16), B = table rows [pair][d] (fp32, split) ---------------
// Steps of 64 along D (the longest contraction: 12 steps at D 768), so each block has twice the
// bytes in flight per step of the 32-wide kernels below and half the steps' latencies in series.
struct FwdLoad {
    static constexpr int BK = 64, SK = BK + 8;
    static constexpr int CA = BK / 8, NA = BM * CA / THREADS;  // 16-byte chunks of X per thread
    static constexpr int CB = BK / 4, NB = BN * CB / THREADS;  // float4 chunks of the table
    const bf16* x;           // row of image b: x + (b * tokens + t) * d
    const float* table;      // gate or classifier rows
    const uint32_t* row;     // shared: table row of the tile's pair n, NO_ROW past the last
    uint32_t b0, batch, tokens, t, d;
    uint4 xa[NA];
    float4 tb[NB];
    __device__ __forceinline__ void fetch(uint32_t k0) {
#pragma unroll
        for (int i = 0; i < NA; i++) {
            const int c = threadIdx.x + i * THREADS, m = c / CA;
            const uint32_t k = k0 + (c % CA) * 8;
            xa[i] = b0 + m < batch && k < d ? *reinterpret_cast<const uint4*>(x + ((uint64_t)(b0 + m) * tokens + t) * d + k)
                                            : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < NB; i++) {
            const int c = threadIdx.x + i * THREADS, n = c / CB;
            const uint32_t k = k0 + (c % CB) * 4;
            const uint32_t rw = row[n];
            tb[i] = rw != NO_ROW && k < d ? *reinterpret_cast<const float4*>(table + (uint64_t)rw * d + k)
                                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    }
    __device__ __forceinline__ void store(bf16* a_hi, bf16*, bf16* b_hi, bf16* b_lo) const {
#pragma unroll
        for (int i = 0; i < NA; i++) {
            const int c = threadIdx.x + i * THREADS;
            *reinterpret_cast<uint4*>(a_hi + (c / CA) * SK + (c % CA) * 8) = xa[i];
        }
#pragma unroll
        for (int i = 0; i < NB; i++) {
            const int c = threadIdx.x + i * THREADS, off = (c / CB) * SK + (c % CB) * 4;
            split4(tb[i], b_hi + off, b_lo + off);
        }
    }
};

}  // namespace moe_mma

extern "C" __global__ void __launch_bounds__(moe_mma::THREADS) moe_fwd_scores_mma(
const MoeParams p) {
    MOE_SCORES_ARGS(p);
    using namespace moe_mma;
    __shared__ uint32_t s_item[BN], s_row[BN];
    const uint32_t t = blockIdx.x, product = blockIdx.z & 1, j0 = (blockIdx.z >> 1) * BN;
    const uint32_t i0 = tok_offsets[t], count = tok_offsets[t + 1] - i0;
    if (j0 >= count) return;  // uniform over the block
    const uint32_t np = min(count - j0, (uint32_t)BN);
    if (threadIdx.x < BN) {
        const uint32_t j = threadIdx.x;
        const uint32_t idx = j < np ? tok_items[i0 + j0 + j] : 0u;
        s_item[j] = idx;
        s_row[j] = j < np ? (product ? idx % labels : grow[idx]) : NO_ROW;
    }
    __syncthreads();
    FwdLoad ld{product ? adapted : z, product ? w : gate, s_row, blockIdx.y * BM, batch, tokens, t, d};
    float acc[2][4][4];
    block_gemm<false, true, false>(ld, d, acc);
    float* out = product ? r : q;
    const uint64_t stride = (uint64_t)experts * labels;
    const uint32_t b0 = blockIdx.y * BM;
    for_acc_pairs(acc, [&](int m, int n, float v0, float v1) {
        if (b0 + m < batch) {
            float* o = out + (uint64_t)(b0 + m) * stride;
            if ((uint32_t)n < np) o[s_item[n]] = v0;
            if ((uint32_t)n + 1 < np) o[s_item[n + 1]] = v1;
        }
    });
}

namespace moe_mma {

// ---- token gradients: A = coef [image][pair] (fp32, split), B = table rows [pair][d] (fp32,
// split; stored [k][n]) ------------------------------------------------------------------------
struct TokLoad {
    static constexpr int BK = 32, SK = BK + 8;
    const float* coef;       // [B, E*K]
    const float* table;
    const uint32_t* grow;    // null: the classifier (row k = idx % labels)
    const uint32_t* items;   // the token's pairs (tok's inverse from its offset)
    uint32_t b0, batch, np, c0, d, labels;
    uint64_t stride;
    float ca[16];
    float4 tb[4];
    __device__ __forceinline__ void fetch(uint32_t k0) {
        // A: 64 images x 32 pairs; this thread's pair is k0 + (tid & 31) for all 16 images.
        const uint32_t j = k0 + (threadIdx.x & 31);
        const bool jok = j < np;
        const uint32_t idx = jok ? items[j] : 0u;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const uint32_t b = b0 + (threadIdx.x >> 5) + 4 * i;
            ca[i] = jok && b < batch ? coef[(uint64_t)b * stride + idx] : 0.0f;
        }
        // B: 32 pairs x 16 chunks of 4 columns; this thread's pairs are k0 + (tid >> 4) + 8 i.
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t jj = k0 + (threadIdx.x >> 4) + 8 * i;
            const uint32_t col = c0 + (threadIdx.x & 15) * 4;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (jj < np && col < d) {
                const uint32_t id = items[jj];
                const uint32_t rw = grow ? grow[id] : id % labels;
                v = *reinterpret_cast<const float4*>(table + (uint64_t)rw * d + col);
            }
            tb[i] = v;
        }
    }
    __device__ __forceinline__ void store(bf16* a_hi, bf16* a_lo, bf16* b_hi, bf16* b_lo) const {
        const int j = threadIdx.x & 31;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const int off = ((threadIdx.x >> 5) + 4 * i) * SK + j;
            split1(ca[i], a_hi + off, a_lo + off);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int off = ((threadIdx.x >> 4) + 8 * i) * SN + (threadIdx.x & 15) * 4;
            split4(tb[i], b_hi + off, b_lo + off);
        }
    }
};

}  // namespace moe_mma

extern "C" __global__ void __launch_bounds__(moe_mma::THREADS) moe_bwd_tokens_mma(
const MoeParams p) {
    MOE_TOKENS_ARGS(p);
    using namespace moe_mma;
    const uint32_t t = blockIdx.x, product = blockIdx.z & 1, c0 = (blockIdx.z >> 1) * BN;
    const uint32_t i0 = tok_offsets[t], np = tok_offsets[t + 1] - i0;
    if (np == 0 || c0 >= d) return;  // a token of the other branch stays untouched
    const uint32_t b0 = blockIdx.y * BM;
    TokLoad ld{product ? dr : dq, product ? w : gate, product ? nullptr : grow, tok_items + i0,
               b0, batch, np, c0, d, labels, (uint64_t)experts * labels};
    float acc[2][4][4];
    block_gemm<true, true, true>(ld, np, acc);
    bf16* out = product ? dadapted : dz;
    for_acc_pairs(acc, [&](int m, int n, float v0, float v1) {
        if (b0 + m < batch && c0 + n < d) {  // d even, n even: both columns in range
            bf162* o = reinterpret_cast<bf162*>(out + ((uint64_t)(b0 + m) * tokens + t) * d + c0 + n);
            const float2 prev = __bfloat1622float2(*o);
            *o = __floats2bfloat162_rn(prev.x + v0, prev.y + v1);
        }
    });
}

namespace moe_mma {

// ---- pair rows: A = coef^T [pair][image] (fp32, split), B = X [image][d] (bf16, [k][n]) ------
struct PairLoad {
    static constexpr int BK = 32, SK = BK + 8;
    const float* coef;
    const bf16* x;
    const uint32_t* item;    // shared: the tile's pair indices
    uint32_t np, batch, tokens, t, c0, d;
    uint64_t stride;
    float ca[16];
    uint4 xb[2];
    __device__ __forceinline__ void fetch(uint32_t k0) {
        // A: 64 pairs x 32 images; this thread's pair is tid & 63, its images k0 + (tid >> 6) + 2 i.
        const uint32_t j = threadIdx.x & 63;
        const bool jok = j < np;
        const uint32_t idx = item[j];
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const uint32_t b = k0 + (threadIdx.x >> 6) + 2 * i;
            ca[i] = jok && b < batch ? coef[(uint64_t)b * stride + idx] : 0.0f;
        }
        // B: 32 images x 8 chunks of 8 columns.
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int c = threadIdx.x + i * THREADS;
            const uint32_t b = k0 + (c >> 3), col = c0 + (c & 7) * 8;
            xb[i] = b < batch && col < d ? *reinterpret_cast<const uint4*>(x + ((uint64_t)b * tokens + t) * d + col)
                                         : make_uint4(0, 0, 0, 0);
        }
    }
    __device__ __forceinline__ void store(bf16* a_hi, bf16* a_lo, bf16* b_hi, bf16*) const {
        const int j = threadIdx.x & 63;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const int off = j * SK + (threadIdx.x >> 6) + 2 * i;
            split1(ca[i], a_hi + off, a_lo + off);
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int c = threadIdx.x + i * THREADS;
            *reinterpret_cast<uint4*>(b_hi + (c >> 3) * SN + (c & 7) * 8) = xb[i];
        }
    }
};

}  // namespace moe_mma

extern "C" __global__ void __launch_bounds__(moe_mma::THREADS) moe_bwd_pairs_mma(
const MoeParams p) {
    MOE_PAIRS_ARGS(p);
    using namespace moe_mma;
    __shared__ uint32_t s_item[BM];
    const uint32_t t = blockIdx.x, j0 = blockIdx.y * BM, c0 = blockIdx.z * BN;
    const uint32_t i0 = tok_offsets[t], count = tok_offsets[t + 1] - i0;
    if (j0 >= count || c0 >= d) return;  // uniform over the block
    const uint32_t np = min(count - j0, (uint32_t)BM);
    if (threadIdx.x < BM) s_item[threadIdx.x] = threadIdx.x < np ? tok_items[i0 + j0 + threadIdx.x] : 0u;
    __syncthreads();
    PairLoad ld{coef, x, s_item, np, batch, tokens, t, c0, d, (uint64_t)experts * labels};
    float acc[2][4][4];
    block_gemm<true, false, true>(ld, batch, acc);
    for_acc_pairs(acc, [&](int m, int n, float v0, float v1) {
        if ((uint32_t)m < np && c0 + n < d)
            *reinterpret_cast<float2*>(pair_rows + (uint64_t)s_item[m] * d + c0 + n) = make_float2(v0, v1);
    });
}
