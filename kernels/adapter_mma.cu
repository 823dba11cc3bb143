// The adapter kernels of the head (head.cu's adapter_fwd, adapter_bwd_tokens and
// adapter_bwd_params; docs/MODEL.md#adapters) with their rank-r products on tensor cores. Same
// arguments and outputs as those three (the parameter gradients: see adapter_bwd_params_mma
// below):
//   adapter_fwd_mma:         u = W1_t z + b1_t (saved, fp32 [B, P, r]),
//                            out[b,t] = z + b2_t + W2_t gelu(u)                     (bf16)
//   adapter_bwd_tokens_mma:  du = (dout W2_t) * gelu'(u) (saved, fp32 [B, P, r]),
//                            dz[b,t] += dout + du W1_t                              (bf16)
// Why: head.cu's versions reduce each (image, rank) dot product over D with warp shuffles and
// a block barrier per 4 images, a long dependent chain per group of 4 images for a kernel that
// should stream memory (its measured version moved 31% and 19% of the copy bandwidth,
// docs/PERF.md). Here a block takes 16 images of a token (one m16 tile) and its 4 warps split
// D by 16-column chunks: the down-projection is one mma accumulation along the warp's chunks
// (no shuffles), one barrier adds the 4 warps' partials, and the up-projection is an mma per
// 8 columns with K = r (padded to 16), written straight from the accumulators.
//
// Precision: z and dout are bf16 (exact operands); W1, W2, gelu(u) and du are fp32 split into
// hi + lo bf16 (split_bf16x2: hi*hi + hi*lo + lo*hi, fp32 tensor-core accumulation, whose
// adds truncate), so u and du are within ~2^-16 of the sum of |terms| of fp32 dot products (as
// in moe_mma.cu), and out, dz are rounded to bf16 once as head.cu's are. Deterministic: fixed chunk order per warp, warps added in order.
//
// Launch (src/ops/head/cuda.rs, HeadKernels::Mma): grid (P, ceil(B/16)) for the first two,
// (P, ceil(D/64)) for the parameter gradients, 128 threads, for
// D % 8 == 0, D <= 1024, r <= HEAD_MAX_RANK (64), 16-byte-aligned pointers.
#include "common.cuh"
#include "ptx.cuh"

namespace ada_mma {

constexpr int ROWS = ADA_IMAGES;  // images per block (the m16 tile)
static_assert(ROWS == 16, "a block's images are one m16 tile");
constexpr int WARPS = MMA_WARPS, THREADS = 32 * WARPS;
constexpr int MAX_RANK = HEAD_MAX_RANK;
constexpr int RT = MAX_RANK / 8;   // rank n-tiles of the down-projection
constexpr int RK = MAX_RANK / 16;  // rank k-steps of the up-projection
constexpr int RS = MAX_RANK + 8;   // row stride (floats) of the shared [16][r] tiles

// A (16 x 16) operand of rows b0 .. b0 + 15 and columns c0 .. c0 + 15 of x (bf16 [B, P, D] at
// token t), loaded straight from global memory: rows past the batch and columns past D are 0.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* x, uint32_t b0, uint32_t batch, uint32_t tokens,
                                       uint32_t t, uint32_t d, uint32_t c0, int lane) {
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint32_t b = b0 + g + (i & 1) * 8, c = c0 + (i >> 1) * 8 + 2 * tq;
        a[i] = b < batch && c < d ? *reinterpret_cast<const uint32_t*>(x + ((uint64_t)b * tokens + t) * d + c) : 0u;
    }
}

// acc[nt] += A B for the rank n-tiles nt < ceil(r/8), B[k][n] = w(column c0 + k, rank 8 nt + n)
// read through `at(col, j)` (fp32, split hi/lo; 0 past r or D).
template <class W>
__device__ __forceinline__ void down_chunk(float (&acc)[RT][4], const uint32_t (&a)[4], uint32_t c0, uint32_t d,
                                           uint32_t rank, int lane, W at) {
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int nt = 0; nt < RT; nt++) {
        if (nt * 8 >= (int)rank) break;
        const uint32_t j = nt * 8 + g;
        float v[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {  // b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
            const uint32_t c = c0 + (i >> 1) * 8 + 2 * tq + (i & 1);
            v[i] = j < rank && c < d ? at(c, j) : 0.0f;
        }
        uint32_t bh[2], bl[2];
        split_bf16x2(v[0], v[1], bh[0], bl[0]);
        split_bf16x2(v[2], v[3], bh[1], bl[1]);
        mma(acc[nt], a, bh[0], bh[1]);
        mma(acc[nt], a, bl[0], bl[1]);
    }
}

// s[row][j] = sum over the block's warps (in order) of their down-projection partials, for the
// 16 rows and j < r: red [WARPS][16][RS] in shared memory, then the caller's barrier.
__device__ __forceinline__ void stage_partials(float* red, const float (&acc)[RT][4], uint32_t rank, int lane, int warp) {
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int nt = 0; nt < RT; nt++) {
        if (nt * 8 >= (int)rank) break;
#pragma unroll
        for (int e = 0; e < 4; e++)
            red[(warp * ROWS + g + (e >> 1) * 8) * RS + nt * 8 + 2 * tq + (e & 1)] = acc[nt][e];
    }
}

// The up-projection's A operands (16 x 16 per rank k-step, hi and lo) from the shared [16][RS]
// tile h (fp32; columns past r are zero-filled by the caller).
__device__ __forceinline__ void load_up_a(uint32_t (&ah)[RK][4], uint32_t (&al)[RK][4], const float* h, uint32_t rank,
                                          int lane) {
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int kt = 0; kt < RK; kt++) {
        if (kt * 16 >= (int)rank) break;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = g + (i & 1) * 8, col = kt * 16 + (i >> 1) * 8 + 2 * tq;
            split_bf16x2(h[row * RS + col], h[row * RS + col + 1], ah[kt][i], al[kt][i]);
        }
    }
}

// c = A B for one 8-column tile: B[k][n] = w(rank 16 kt + k, column n0 + n) through at(j, col)
// (fp32, split; 0 past r or D).
template <class W>
__device__ __forceinline__ void up_tile(float (&c)[4], const uint32_t (&ah)[RK][4], const uint32_t (&al)[RK][4],
                                        uint32_t n0, uint32_t d, uint32_t rank, int lane, W at) {
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int e = 0; e < 4; e++) c[e] = 0.0f;
    const uint32_t col = n0 + g;
#pragma unroll
    for (int kt = 0; kt < RK; kt++) {
        if (kt * 16 >= (int)rank) break;
        float v[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {  // b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
            const uint32_t j = kt * 16 + (i >> 1) * 8 + 2 * tq + (i & 1);
            v[i] = j < rank && col < d ? at(j, col) : 0.0f;
        }
        uint32_t bh[2], bl[2];
        split_bf16x2(v[0], v[1], bh[0], bl[0]);
        split_bf16x2(v[2], v[3], bh[1], bl[1]);
        mma(c, ah[kt], bh[0], bh[1]);
        mma(c, ah[kt], bl[0], bl[1]);
        mma(c, al[kt], bh[0], bh[1]);
    }
}

// The down-projection of the block's 16 rows of x at token t over this warp's 16-column
// chunks (warp, warp + 4, ...), summed over the warps into red; after it, every thread may read
// red[row * RS + j] (warp 0's slot) = the full sum.
template <class W>
__device__ __forceinline__ void down_projection(float* red, const bf16* x, uint32_t b0, uint32_t batch, uint32_t tokens,
                                                uint32_t t, uint32_t d, uint32_t rank, W at) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[RT][4];
#pragma unroll
    for (int nt = 0; nt < RT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[nt][e] = 0.0f;
    const uint32_t chunks = (d + 15) / 16;
    // Two chunks per iteration: both chunks' loads are in flight before either's products.
    for (uint32_t kc = warp; kc < chunks; kc += 2 * WARPS) {
        uint32_t a0[4], a1[4];
        load_a(a0, x, b0, batch, tokens, t, d, kc * 16, lane);
        const bool two = kc + WARPS < chunks;
        if (two) load_a(a1, x, b0, batch, tokens, t, d, (kc + WARPS) * 16, lane);
        down_chunk(acc, a0, kc * 16, d, rank, lane, at);
        if (two) down_chunk(acc, a1, (kc + WARPS) * 16, d, rank, lane, at);
    }
    stage_partials(red, acc, rank, lane, warp);
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < ROWS * rank; i += THREADS) {
        const uint32_t row = i / rank, j = i % rank;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) s += red[(w * ROWS + row) * RS + j];
        red[row * RS + j] = s;  // only this thread reads or writes [row][j] of the slot
    }
    __syncthreads();
}

// The up-projection over this warp's columns (the halves of its 16-column chunks, which its
// down-projection read): for each 8-column tile, c = A B (up_tile), then epilogue(col, c) with
// col = the lane's first column (rows g and g + 8 of the block's images; col + 1 < D).
template <class W, class F>
__device__ __forceinline__ void up_projection(const uint32_t (&ah)[RK][4], const uint32_t (&al)[RK][4], uint32_t d,
                                              uint32_t rank, W at, F epilogue) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t tiles = (d + 7) / 8;
    for (uint32_t nt = 2 * warp; nt < tiles; nt += 2 * WARPS) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const uint32_t n0 = (nt + half) * 8;
            if (n0 >= d) break;
            float c[4];
            up_tile(c, ah, al, n0, d, rank, lane, at);
            epilogue(n0 + 2 * (lane & 3), c);
        }
    }
}

}  // namespace ada_mma

extern "C" __global__ void __launch_bounds__(ada_mma::THREADS) adapter_fwd_mma(
    const bf16* __restrict__ z, const float* __restrict__ w1, const float* __restrict__ b1,
    const float* __restrict__ w2, const float* __restrict__ b2, float* __restrict__ u, bf16* __restrict__ out,
    uint32_t batch, uint32_t tokens, uint32_t d, uint32_t rank) {
    using namespace ada_mma;
    __shared__ float red[WARPS * ROWS * RS];
    __shared__ float h[ROWS * RS];
    const uint32_t t = blockIdx.x, b0 = blockIdx.y * ROWS;
    const int lane = threadIdx.x & 31;
    const float* w1t = w1 + (uint64_t)t * rank * d;  // [r][D]
    const float* w2t = w2 + (uint64_t)t * d * rank;  // [D][r]
    down_projection(red, z, b0, batch, tokens, t, d, rank, [&](uint32_t c, uint32_t j) { return w1t[(uint64_t)j * d + c]; });
    // u = W1 z + b1 (saved), h = gelu(u), zero past r (the up-projection's padded K).
    for (uint32_t i = threadIdx.x; i < ROWS * RK * 16; i += THREADS) {
        const uint32_t row = i / (RK * 16), j = i % (RK * 16);
        float g = 0.0f;
        if (j < rank) {
            const float uv = red[row * RS + j] + b1[(uint64_t)t * rank + j];
            if (b0 + row < batch) u[((uint64_t)(b0 + row) * tokens + t) * rank + j] = uv;
            g = gelu_f(uv);
        }
        h[row * RS + j] = g;
    }
    __syncthreads();
    uint32_t ah[RK][4], al[RK][4];
    load_up_a(ah, al, h, rank, lane);
    // out = z + b2 + W2 h, 8 columns at a time.
    const int g = lane >> 2;
    up_projection(ah, al, d, rank, [&](uint32_t j, uint32_t col) { return w2t[(uint64_t)col * rank + j]; },
                  [&](uint32_t col, const float (&c)[4]) {
                      const float2 bias = *reinterpret_cast<const float2*>(b2 + (uint64_t)t * d + col);
#pragma unroll
                      for (int r2 = 0; r2 < 2; r2++) {
                          const uint32_t b = b0 + g + r2 * 8;
                          if (b >= batch) continue;
                          const uint64_t off = ((uint64_t)b * tokens + t) * d + col;
                          const float2 zv = __bfloat1622float2(*reinterpret_cast<const bf162*>(z + off));
                          *reinterpret_cast<bf162*>(out + off) =
                              __floats2bfloat162_rn(zv.x + bias.x + c[2 * r2], zv.y + bias.y + c[2 * r2 + 1]);
                      }
                  });
}

extern "C" __global__ void __launch_bounds__(ada_mma::THREADS) adapter_bwd_tokens_mma(
    const bf16* __restrict__ dout, const float* __restrict__ u, const float* __restrict__ w1,
    const float* __restrict__ w2, float* __restrict__ du, bf16* __restrict__ dz, uint32_t batch, uint32_t tokens,
    uint32_t d, uint32_t rank) {
    using namespace ada_mma;
    __shared__ float red[WARPS * ROWS * RS];
    __shared__ float h[ROWS * RS];
    const uint32_t t = blockIdx.x, b0 = blockIdx.y * ROWS;
    const int lane = threadIdx.x & 31;
    const float* w1t = w1 + (uint64_t)t * rank * d;
    const float* w2t = w2 + (uint64_t)t * d * rank;
    // s = dout W2 (the down-projection with B[col][j] = W2[col][j]).
    down_projection(red, dout, b0, batch, tokens, t, d, rank, [&](uint32_t c, uint32_t j) { return w2t[(uint64_t)c * rank + j]; });
    // du = s * gelu'(u) (saved; 0 for rows past the batch and past r).
    for (uint32_t i = threadIdx.x; i < ROWS * RK * 16; i += THREADS) {
        const uint32_t row = i / (RK * 16), j = i % (RK * 16);
        float g = 0.0f;
        if (j < rank && b0 + row < batch) {
            const uint64_t ui = ((uint64_t)(b0 + row) * tokens + t) * rank + j;
            g = red[row * RS + j] * gelu_grad_f(u[ui]);
            du[ui] = g;
        }
        h[row * RS + j] = g;
    }
    __syncthreads();
    uint32_t ah[RK][4], al[RK][4];
    load_up_a(ah, al, h, rank, lane);
    // dz += dout + du W1, 8 columns at a time.
    const int g = lane >> 2;
    up_projection(ah, al, d, rank, [&](uint32_t j, uint32_t col) { return w1t[(uint64_t)j * d + col]; },
                  [&](uint32_t col, const float (&c)[4]) {
#pragma unroll
                      for (int r2 = 0; r2 < 2; r2++) {
                          const uint32_t b = b0 + g + r2 * 8;
                          if (b >= batch) continue;
                          const uint64_t off = ((uint64_t)b * tokens + t) * d + col;
                          const float2 gv = __bfloat1622float2(*reinterpret_cast<const bf162*>(dout + off));
                          bf162* o = reinterpret_cast<bf162*>(dz + off);
                          const float2 prev = __bfloat1622float2(*o);
                          *o = __floats2bfloat162_rn(prev.x + (gv.x + c[2 * r2]), prev.y + (gv.y + c[2 * r2 + 1]));
                      }
                  });
}

// Parameter gradients of token t's adapter, batch-reduced as matrix products (K = the batch):
//   dW1_t = du^T z  [r, D],   dW2_t^T = gelu(u)^T dout  [r, D] (written transposed into
//   dW2 [P, D, r]),   db2_t = sum_b dout (column sums of the staged dout tile),
//   db1_t = sum_b du (column tile 0).
// Block = token t and 64 columns, 128 threads; warp w owns columns 16 w .. 16 w + 15 and every
// rank row (ceil(r/16) m-tiles). Steps of 32 images: du and gelu(u) [r][32] split hi/lo into
// shared memory (A, [m][k]), z and dout [32][64] bf16 (B, [k][n], ldmatrix .trans). Fixed
// order over the images: deterministic. Grid (P, ceil(D/64)): 360 blocks at P 30, D 768, where
// head.cu's adapter_bwd_params has 90 and reads z and dout once per 4 ranks.
namespace ada_mma {
constexpr int PK = 32;            // images per step
constexpr int PSK = PK + 8;       // row stride (bf16) of the [rank][image] stages
constexpr int PN = ADA_PARAM_COLS;  // columns per block
constexpr int PSN = PN + 8;       // row stride of the [image][column] stages
}  // namespace ada_mma

extern "C" __global__ void __launch_bounds__(ada_mma::THREADS) adapter_bwd_params_mma(
    const bf16* __restrict__ dout, const bf16* __restrict__ z, const float* __restrict__ u,
    const float* __restrict__ du, float* __restrict__ dw1, float* __restrict__ db1, float* __restrict__ dw2,
    float* __restrict__ db2, uint32_t batch, uint32_t tokens, uint32_t d, uint32_t rank) {
    using namespace ada_mma;
    __shared__ __align__(16) bf16 sa[4][MAX_RANK * PSK];  // du hi, du lo, gelu(u) hi, gelu(u) lo
    __shared__ __align__(16) bf16 sb[2][PK * PSN];        // z, dout
    const uint32_t t = blockIdx.x, c0 = blockIdx.y * PN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const uint32_t mts = (rank + 15) / 16, rows = mts * 16;
    float acc[2][RK][2][4];  // [product][m-tile][n-tile][e]
#pragma unroll
    for (int pr = 0; pr < 2; pr++)
#pragma unroll
        for (int mt = 0; mt < RK; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[pr][mt][h][e] = 0.0f;
    float colsum = 0.0f;  // db2 of column c0 + threadIdx.x (threads < 64)
    for (uint32_t b0 = 0; b0 < batch; b0 += PK) {
        // Rank-fastest across threads: each image's u, du row (r floats) is read contiguously.
        for (uint32_t i = threadIdx.x; i < rows * PK; i += THREADS) {
            const uint32_t j = i % rows, bb = i / rows, b = b0 + bb;
            float dv = 0.0f, gv = 0.0f;
            if (j < rank && b < batch) {
                const uint64_t ui = ((uint64_t)b * tokens + t) * rank + j;
                dv = du[ui];
                gv = gelu_f(u[ui]);
            }
            const uint32_t off = j * PSK + bb;
            const bf16 dh = __float2bfloat16_rn(dv), gh = __float2bfloat16_rn(gv);
            sa[0][off] = dh;
            sa[1][off] = __float2bfloat16_rn(dv - __bfloat162float(dh));
            sa[2][off] = gh;
            sa[3][off] = __float2bfloat16_rn(gv - __bfloat162float(gh));
        }
#pragma unroll
        for (int i = 0; i < PK * PN / 8 / THREADS; i++) {
            const int c = threadIdx.x + i * THREADS, bb = c / (PN / 8), ch = c % (PN / 8);
            const uint32_t b = b0 + bb, col = c0 + ch * 8;
            const bool ok = b < batch && col < d;
            const uint64_t off = ((uint64_t)b * tokens + t) * d + col;
            *reinterpret_cast<uint4*>(&sb[0][bb * PSN + ch * 8]) = ok ? *reinterpret_cast<const uint4*>(z + off) : make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(&sb[1][bb * PSN + ch * 8]) = ok ? *reinterpret_cast<const uint4*>(dout + off) : make_uint4(0, 0, 0, 0);
        }
        __syncthreads();
        if (threadIdx.x < PN)
            for (int bb = 0; bb < PK; bb++) colsum += __bfloat162float(sb[1][bb * PSN + threadIdx.x]);
#pragma unroll
        for (int kk = 0; kk < PK / 16; kk++) {
            uint32_t bz[4], bd[4];
            const int boff = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PSN + warp * 16 + (lane >> 4) * 8;
            ldsm_x4_t(bz, smem_u32(&sb[0][boff]));
            ldsm_x4_t(bd, smem_u32(&sb[1][boff]));
#pragma unroll
            for (int mt = 0; mt < RK; mt++) {
                if (mt >= (int)mts) break;
                const int aoff = (mt * 16 + (lane & 15)) * PSK + kk * 16 + (lane >> 4) * 8;
                uint32_t a[4][4];
#pragma unroll
                for (int q = 0; q < 4; q++) ldsm_x4(a[q], smem_u32(&sa[q][aoff]));
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    mma(acc[0][mt][h], a[0], bz[2 * h], bz[2 * h + 1]);
                    mma(acc[0][mt][h], a[1], bz[2 * h], bz[2 * h + 1]);
                    mma(acc[1][mt][h], a[2], bd[2 * h], bd[2 * h + 1]);
                    mma(acc[1][mt][h], a[3], bd[2 * h], bd[2 * h + 1]);
                }
            }
        }
        __syncthreads();  // the stages are rewritten by the next step
    }
    float* dw1t = dw1 + (uint64_t)t * rank * d;
    float* dw2t = dw2 + (uint64_t)t * d * rank;
#pragma unroll
    for (int mt = 0; mt < RK; mt++) {
        if (mt >= (int)mts) break;
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int r2 = 0; r2 < 2; r2++) {
                const uint32_t j = mt * 16 + g + 8 * r2, col = c0 + warp * 16 + h * 8 + 2 * tq;
                if (j >= rank || col >= d) continue;  // d even: col + 1 < d too
                *reinterpret_cast<float2*>(dw1t + (uint64_t)j * d + col) = make_float2(acc[0][mt][h][2 * r2], acc[0][mt][h][2 * r2 + 1]);
                dw2t[(uint64_t)col * rank + j] = acc[1][mt][h][2 * r2];
                dw2t[(uint64_t)(col + 1) * rank + j] = acc[1][mt][h][2 * r2 + 1];
            }
    }
    if (threadIdx.x < PN && c0 + threadIdx.x < d) db2[(uint64_t)t * d + c0 + threadIdx.x] = colsum;
    if (blockIdx.y == 0 && warp == 0) warp_column_sums(du + (uint64_t)t * rank, (uint64_t)tokens * rank, batch, rank, db1 + (uint64_t)t * rank);
}
