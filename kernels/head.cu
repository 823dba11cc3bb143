// The ML-VPT head (docs/MODEL.md#the-label-aware-mixture-of-experts-head), forward and
// backward, mirroring src/ops/head/cpu.rs op for op.
// Storage: tokens Z, adapted features a(Z) and their gradients are bf16 [B, P, D] (the GPU
// backend's activations); parameters (W1 [P,r,D], b1 [P,r], W2 [P,D,r], b2 [P,D], gate table
// G [rows,D], classifier W [K,D], c [K]), their gradients and every per-(b,k) or per-(b,e,k)
// quantity (q, r, y, m, dq, dr, u, du) are fp32. All sums are fp32 in a fixed order, so every
// kernel is deterministic; none uses atomics.
//
// Shapes the launcher (src/ops/head/cuda.rs) guarantees: D % 8 == 0 and D <= 1024 (each lane
// or thread owns chunks of 8 columns, one 16-byte bf16 load), E <= HEAD_MAX_E, r <=
// HEAD_MAX_RANK, every pointer 16-byte aligned, every table entry in range.
//
// Gating tables (as the CPU op): tok[e*K + k] is the token of expert e of label k, grow[e*K + k]
// its gate row. The backward also takes their inverses in CSR form (per token / per gate row,
// the (e, k) pairs pointing at it in increasing order), built once on the host, so that token
// and gate-row gradients are gathers, not contended scatters.
#include "common.cuh"
#include "moe_params.cuh"

// HEAD_MAX_D, HEAD_MAX_E, HEAD_MAX_RANK and the block shapes below (MOE_FWD_IMAGES, TOK_IMAGES,
// ROWS_WARPS, PAIR_TILE, ADA_IMAGES): src/contract.rs, which the launcher reads too.
constexpr int HEAD_MAX_CH = HEAD_MAX_D / 8;  // chunks of 8 columns in the widest row

// ------------------------------------------------------------------ MoE forward
// Two launches; the [B, K, D] mixture is never formed (y = sum_e A_e <W[k], a(Z)> + c[k]).
// 1. moe_fwd_scores, block = token t and MOE_FWD_IMAGES images: each warp holds one image's Z
//    and a(Z) rows of token t in registers (packed bf16, read once) and walks the (e, k) pairs
//    pointing at t (tok's inverse): q[b,e,k] = <G[grow], Z[b,t]>, r[b,e,k] = <W[k], a(Z)[b,t]>.
//    Token-major, so Z is read once per image and the block's warps share each G/W row
//    through L1, instead of re-reading Z rows once per label. Tokens no pair points at (the
//    other branch's) exit at once.
constexpr int MOE_MAX_CH_PER_LANE = HEAD_MAX_CH / 32;

__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&o)[8]) {
    const bf162* h = reinterpret_cast<const bf162*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float2 f = __bfloat1622float2(h[k]);
        o[2 * k] = f.x;
        o[2 * k + 1] = f.y;
    }
}

extern "C" __global__ void __launch_bounds__(256) moe_fwd_scores(
const MoeParams p) {
    MOE_SCORES_ARGS(p);
    const uint32_t t = blockIdx.x;
    const uint32_t i0 = tok_offsets[t], i1 = tok_offsets[t + 1];
    if (i0 == i1) return;
    const int lane = threadIdx.x & 31;
    const uint32_t warps = blockDim.x >> 5;
    const uint32_t nch = d / 8;
    const uint64_t stride = (uint64_t)experts * labels;
    const uint32_t b_end = min(batch, (blockIdx.y + 1) * MOE_FWD_IMAGES);
    for (uint32_t b = blockIdx.y * MOE_FWD_IMAGES + (threadIdx.x >> 5); b < b_end; b += warps) {
        const uint64_t off = ((uint64_t)b * tokens + t) * d;
        uint4 zr[MOE_MAX_CH_PER_LANE], ar[MOE_MAX_CH_PER_LANE];
#pragma unroll
        for (int i = 0; i < MOE_MAX_CH_PER_LANE; i++) {
            const uint32_t ch = lane + 32 * i;
            if (ch < nch) {
                zr[i] = *reinterpret_cast<const uint4*>(z + off + ch * 8);
                ar[i] = *reinterpret_cast<const uint4*>(adapted + off + ch * 8);
            } else {
                zr[i] = make_uint4(0, 0, 0, 0);
                ar[i] = make_uint4(0, 0, 0, 0);
            }
        }
        for (uint32_t it = i0; it < i1; it++) {
            const uint32_t idx = tok_items[it];
            const float* gr = gate + (uint64_t)grow[idx] * d;
            const float* wr = w + (uint64_t)(idx % labels) * d;
            float sq = 0.0f, sr = 0.0f;
#pragma unroll
            for (int i = 0; i < MOE_MAX_CH_PER_LANE; i++) {
                const uint32_t ch = lane + 32 * i;
                if (ch < nch) {
                    float zv[8], av[8], gv[8], wv[8];
                    unpack_bf16x8(zr[i], zv);
                    unpack_bf16x8(ar[i], av);
                    load_f32<8>(gr + ch * 8, gv);
                    load_f32<8>(wr + ch * 8, wv);
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        sq = fmaf(zv[j], gv[j], sq);
                        sr = fmaf(av[j], wv[j], sr);
                    }
                }
            }
            sq = warp_sum(sq);
            sr = warp_sum(sr);
            if (lane == 0) {
                q[(uint64_t)b * stride + idx] = sq;
                r[(uint64_t)b * stride + idx] = sr;
            }
        }
    }
}

// 2. moe_fwd_mix, one thread per (b, k): A = softmax_e q[b,:,k], m = sum_e A q,
//    y = sum_e A r + c[k] (the CPU op's order: max, then exp-weighted sums).
extern "C" __global__ void moe_fwd_mix(const float* __restrict__ q, const float* __restrict__ r,
                                       const float* __restrict__ c, float* __restrict__ y, float* __restrict__ m,
                                       uint32_t batch, uint32_t labels, uint32_t experts) {
    const uint64_t n = (uint64_t)batch * labels;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        const uint64_t b = i / labels, k = i % labels;
        const uint64_t base = b * experts * labels + k;
        float mx = q[base];
        for (uint32_t e = 1; e < experts; e++) mx = fmaxf(mx, q[base + (uint64_t)e * labels]);
        float den = 0.0f, num_m = 0.0f, num_y = 0.0f;
        for (uint32_t e = 0; e < experts; e++) {
            const float qe = q[base + (uint64_t)e * labels];
            const float a = expf(qe - mx);
            den += a;
            num_m = fmaf(a, qe, num_m);
            num_y = fmaf(a, r[base + (uint64_t)e * labels], num_y);
        }
        m[i] = num_m / den;
        y[i] = num_y / den + c[k];
    }
}

// ------------------------------------------------------------------ MoE backward
// 1. moe_bwd_coef, one thread per (b, k): from the saved q, r and the incoming dy, dm,
//    dq[b,e,k] = A_e (gy r_e + gm q_e - abar + gm), dr[b,e,k] = gy A_e  (scratch [B, E, K]).
extern "C" __global__ void moe_bwd_coef(const float* __restrict__ dy, const float* __restrict__ dm,
                                        const float* __restrict__ q, const float* __restrict__ r,
                                        float* __restrict__ dq, float* __restrict__ dr, uint32_t batch,
                                        uint32_t labels, uint32_t experts) {
    const uint64_t n = (uint64_t)batch * labels;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        const uint64_t b = i / labels, k = i % labels;
        const uint64_t base = b * experts * labels + k;
        float qv[HEAD_MAX_E], rv[HEAD_MAX_E];
        float mx = q[base];
#pragma unroll
        for (int e = 0; e < HEAD_MAX_E; e++) {
            if (e < (int)experts) {
                qv[e] = q[base + (uint64_t)e * labels];
                rv[e] = r[base + (uint64_t)e * labels];
                mx = fmaxf(mx, qv[e]);
            } else {
                qv[e] = 0.0f;
                rv[e] = 0.0f;
            }
        }
        float den = 0.0f;
#pragma unroll
        for (int e = 0; e < HEAD_MAX_E; e++)
            if (e < (int)experts) den += expf(qv[e] - mx);
        const float gy = dy[i], gm = dm[i];
        float abar = 0.0f;
#pragma unroll
        for (int e = 0; e < HEAD_MAX_E; e++)
            if (e < (int)experts) abar = fmaf(expf(qv[e] - mx) / den, fmaf(gy, rv[e], gm * qv[e]), abar);
#pragma unroll
        for (int e = 0; e < HEAD_MAX_E; e++) {
            if (e < (int)experts) {
                const float a = expf(qv[e] - mx) / den;
                const float ga = fmaf(gy, rv[e], gm * qv[e]);
                dq[base + (uint64_t)e * labels] = a * (ga - abar + gm);
                dr[base + (uint64_t)e * labels] = gy * a;
            }
        }
    }
}

// 2. moe_bwd_tokens, block = token t and TOK_IMAGES images, thread = 8 columns:
//    dz[b,t] += sum_{(e,k) -> t} dq[b,e,k] G[grow(e,k)], dadapted[b,t] += sum dr[b,e,k] W[k],
//    the (e, k) pairs from tok's inverse in increasing order. A token no pair points at (the
//    other branch's) is left untouched. The G/W rows are re-read per image group from L1.

template <bool ROWS_BY_GATE>
__device__ __forceinline__ void gather_rows_into(bf16* __restrict__ out, const float* __restrict__ coef,
                                                 const float* __restrict__ table, const uint32_t* __restrict__ grow,
                                                 const uint32_t* __restrict__ items, uint32_t i0, uint32_t i1,
                                                 uint32_t b0, uint32_t batch, uint32_t t, uint32_t tokens,
                                                 uint32_t d, uint32_t labels, uint32_t experts, uint32_t ch) {
    float acc[TOK_IMAGES][8];
#pragma unroll
    for (int nb = 0; nb < TOK_IMAGES; nb++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[nb][j] = 0.0f;
    const uint64_t stride = (uint64_t)experts * labels;
    for (uint32_t it = i0; it < i1; it++) {
        const uint32_t idx = items[it];
        const uint32_t row = ROWS_BY_GATE ? grow[idx] : idx % labels;
        float g[8];
        load_f32<8>(table + (uint64_t)row * d + ch * 8, g);
#pragma unroll
        for (int nb = 0; nb < TOK_IMAGES; nb++) {
            const float cf = b0 + nb < batch ? coef[(uint64_t)(b0 + nb) * stride + idx] : 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) acc[nb][j] = fmaf(cf, g[j], acc[nb][j]);
        }
    }
#pragma unroll
    for (int nb = 0; nb < TOK_IMAGES; nb++) {
        if (b0 + nb < batch) {
            bf16* o = out + ((uint64_t)(b0 + nb) * tokens + t) * d + ch * 8;
            float prev[8];
            load_bf16<8>(o, prev);
#pragma unroll
            for (int j = 0; j < 8; j++) prev[j] += acc[nb][j];
            store_bf16<8>(o, prev);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) moe_bwd_tokens(
const MoeParams p) {
    MOE_TOKENS_ARGS(p);
    const uint32_t t = blockIdx.x;
    const uint32_t i0 = tok_offsets[t], i1 = tok_offsets[t + 1];
    const uint32_t ch = threadIdx.x;
    if (i0 == i1 || ch >= d / 8) return;
    const uint32_t b0 = blockIdx.y * TOK_IMAGES;
    gather_rows_into<true>(dz, dq, gate, grow, tok_items, i0, i1, b0, batch, t, tokens, d, labels, experts, ch);
    gather_rows_into<false>(dadapted, dr, w, grow, tok_items, i0, i1, b0, batch, t, tokens, d, labels, experts, ch);
}

// 3. Parameter gradients, token-major. moe_bwd_pairs: block = token t, a tile of PAIR_TILE of
//    the (e, k) pairs pointing at t (tok's inverse), and 256 columns (a lane owns 8); the 8
//    warps split the batch, each lane accumulating PAIR_TILE x 8 sums, then the warps'
//    partials are added in warp order:  pair_rows[idx] = sum_b coef[b, idx] X[b, t].
//    Run with (dr, a(Z)) for the classifier and (dq, Z) for the gate. X rows of a token are
//    read once per pair tile (not once per label), and no output row is contended.
//    moe_sum_pairs then adds pair rows into output rows in a fixed order:
//    out[j] = sum over list(j) of pair_rows[idx], list(j) = {e*K + j : e < E} (offsets null:
//    the classifier, dw) or grow's inverse (the gate rows, dgate; a row no pair uses is 0).
//    Both overwrite; the same bits on every run.

// Warp partials of 8 columns per lane -> shared (lane's 8 columns at 8*lane..), then thread c
// adds column c over the warps in order and writes out_row[(col0 + c) * out_stride]. Row
// stride 257 keeps the column reads conflict-free.
__device__ __forceinline__ void add_warp_partials(float (*part)[257], const float (&acc)[8], float* out_row,
                                                  uint64_t out_stride, uint32_t col0, uint32_t d) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int v = 0; v < 8; v++) part[warp][lane * 8 + v] = acc[v];
    __syncthreads();
    const uint32_t col = col0 + threadIdx.x;
    if (col < d) {
        float s = 0.0f;
#pragma unroll
        for (int wi = 0; wi < ROWS_WARPS; wi++) s += part[wi][threadIdx.x];
        out_row[(uint64_t)col * out_stride] = s;
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(ROWS_WARPS * 32) moe_bwd_pairs(
const MoeParams p) {
    MOE_PAIRS_ARGS(p);
    __shared__ float part[ROWS_WARPS][257];
    const uint32_t t = blockIdx.x;
    const uint32_t i0 = tok_offsets[t] + blockIdx.y * PAIR_TILE;
    const uint32_t i1 = min(tok_offsets[t + 1], i0 + PAIR_TILE);
    if (i0 >= i1) return;  // uniform over the block
    const uint32_t npairs = i1 - i0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t ch = blockIdx.z * 32 + lane;
    const bool live = ch < d / 8;
    const uint64_t stride = (uint64_t)experts * labels;
    uint32_t idx[PAIR_TILE];
#pragma unroll
    for (int pi = 0; pi < PAIR_TILE; pi++) idx[pi] = pi < (int)npairs ? tok_items[i0 + pi] : 0u;
    float acc[PAIR_TILE][8];
#pragma unroll
    for (int pi = 0; pi < PAIR_TILE; pi++)
#pragma unroll
        for (int v = 0; v < 8; v++) acc[pi][v] = 0.0f;
    if (live) {
        for (uint32_t b = warp; b < batch; b += ROWS_WARPS) {
            float xv[8];
            load_bf16<8>(x + ((uint64_t)b * tokens + t) * d + ch * 8, xv);
            const float* cb = coef + (uint64_t)b * stride;
#pragma unroll
            for (int pi = 0; pi < PAIR_TILE; pi++) {
                const float cf = pi < (int)npairs ? cb[idx[pi]] : 0.0f;
#pragma unroll
                for (int v = 0; v < 8; v++) acc[pi][v] = fmaf(cf, xv[v], acc[pi][v]);
            }
        }
    }
#pragma unroll
    for (int pi = 0; pi < PAIR_TILE; pi++)
        if (pi < (int)npairs) add_warp_partials(part, acc[pi], pair_rows + (uint64_t)idx[pi] * d, 1, blockIdx.z * 256, d);
}

extern "C" __global__ void moe_sum_pairs(const float* __restrict__ pair_rows, const uint32_t* __restrict__ offsets,
                                         const uint32_t* __restrict__ items, float* __restrict__ out, uint32_t rows,
                                         uint32_t d, uint32_t labels, uint32_t experts) {
    const uint64_t n = (uint64_t)rows * d;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        const uint64_t j = i / d, c = i % d;
        float s = 0.0f;
        if (offsets) {
            for (uint32_t it = offsets[j]; it < offsets[j + 1]; it++) s += pair_rows[(uint64_t)items[it] * d + c];
        } else {
            for (uint32_t e = 0; e < experts; e++) s += pair_rows[((uint64_t)e * labels + j) * d + c];
        }
        out[i] = s;
    }
}

// ------------------------------------------------------------------ adapters
// Block = token t and ADA_IMAGES images (processed ADA_GROUP at a time), thread = 8 columns
// (blockDim = D/8 rounded up to a warp, <= 128). The rank-r projections are reductions over D:
// per (image, j) a warp sum, then the block's warps added in order through shared memory.
constexpr int ADA_GROUP = 4;
constexpr int ADA_WARPS = HEAD_MAX_CH / 32;

// red[w][nb*r + j] <- warp w's partial; after the barrier, red_out[nb*r + j] = sum over warps.
// Columns ch*8 .. ch*8+7 of token t for images b0 .. b0+ADA_GROUP-1 of x [B, tokens, d]
// (zero past b_end or for an idle thread): the adapters' per-group input tile.
__device__ __forceinline__ void load_image_group(const bf16* __restrict__ x, uint32_t b0, uint32_t b_end,
                                                 uint32_t tokens, uint32_t t, uint32_t d, uint32_t ch,
                                                 bool live, float out[ADA_GROUP][8]) {
#pragma unroll
    for (int nb = 0; nb < ADA_GROUP; nb++) {
        if (live && b0 + nb < b_end) {
            load_bf16<8>(x + ((uint64_t)(b0 + nb) * tokens + t) * d + ch * 8, out[nb]);
        } else {
#pragma unroll
            for (int v = 0; v < 8; v++) out[nb][v] = 0.0f;
        }
    }
}

__device__ __forceinline__ void block_reduce_rank(float (*red)[ADA_GROUP * HEAD_MAX_RANK], float* red_out,
                                                  uint32_t count, uint32_t nwarps) {
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) {
        float s = 0.0f;
        for (uint32_t wi = 0; wi < nwarps; wi++) s += red[wi][i];
        red_out[i] = s;
    }
    __syncthreads();
}

// out[b,t] = z + b2_t + W2_t gelu(u),  u = W1_t z + b1_t (saved, fp32 [B, P, r]).
extern "C" __global__ void __launch_bounds__(128) adapter_fwd(
    const bf16* __restrict__ z, const float* __restrict__ w1, const float* __restrict__ b1,
    const float* __restrict__ w2, const float* __restrict__ b2, float* __restrict__ u, bf16* __restrict__ out,
    uint32_t batch, uint32_t tokens, uint32_t d, uint32_t rank) {
    __shared__ float red[ADA_WARPS][ADA_GROUP * HEAD_MAX_RANK];
    __shared__ float gu[ADA_GROUP * HEAD_MAX_RANK];
    const uint32_t t = blockIdx.x;
    const uint32_t ch = threadIdx.x;
    const bool live = ch < d / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t nwarps = blockDim.x >> 5;
    const float* w1t = w1 + (uint64_t)t * rank * d;
    const float* w2t = w2 + ((uint64_t)t * d + ch * 8) * rank;  // rows ch*8 .. ch*8+7 of W2_t
    const uint32_t b_end = min(batch, (blockIdx.y + 1) * ADA_IMAGES);
    for (uint32_t b0 = blockIdx.y * ADA_IMAGES; b0 < b_end; b0 += ADA_GROUP) {
        float zv[ADA_GROUP][8];
        load_image_group(z, b0, b_end, tokens, t, d, ch, live, zv);
        for (uint32_t j = 0; j < rank; j++) {
            float wv[8];
            if (live) {
                load_f32<8>(w1t + (uint64_t)j * d + ch * 8, wv);
            } else {
#pragma unroll
                for (int v = 0; v < 8; v++) wv[v] = 0.0f;
            }
#pragma unroll
            for (int nb = 0; nb < ADA_GROUP; nb++) {
                float p = 0.0f;
#pragma unroll
                for (int v = 0; v < 8; v++) p = fmaf(zv[nb][v], wv[v], p);
                p = warp_sum(p);
                if (lane == 0) red[warp][nb * rank + j] = p;
            }
        }
        block_reduce_rank(red, gu, ADA_GROUP * rank, nwarps);
        // gu holds W1 z; add b1, save u, replace by gelu(u).
        for (uint32_t i = threadIdx.x; i < ADA_GROUP * rank; i += blockDim.x) {
            const uint32_t nb = i / rank, j = i % rank;
            const float uv = gu[i] + b1[(uint64_t)t * rank + j];
            if (b0 + nb < b_end) u[((uint64_t)(b0 + nb) * tokens + t) * rank + j] = uv;
            gu[i] = gelu_f(uv);
        }
        __syncthreads();
        if (live) {
            float bias[8];
            load_f32<8>(b2 + (uint64_t)t * d + ch * 8, bias);
            float o[ADA_GROUP][8];
#pragma unroll
            for (int nb = 0; nb < ADA_GROUP; nb++)
#pragma unroll
                for (int v = 0; v < 8; v++) o[nb][v] = zv[nb][v] + bias[v];
            for (uint32_t j = 0; j < rank; j++) {
                float wv[8];
#pragma unroll
                for (int v = 0; v < 8; v++) wv[v] = w2t[v * rank + j];
#pragma unroll
                for (int nb = 0; nb < ADA_GROUP; nb++) {
                    const float g = gu[nb * rank + j];
#pragma unroll
                    for (int v = 0; v < 8; v++) o[nb][v] = fmaf(wv[v], g, o[nb][v]);
                }
            }
#pragma unroll
            for (int nb = 0; nb < ADA_GROUP; nb++)
                if (b0 + nb < b_end) store_bf16<8>(out + ((uint64_t)(b0 + nb) * tokens + t) * d + ch * 8, o[nb]);
        }
        __syncthreads();  // gu and red are reused by the next group
    }
}

// Backward, per image: du = (dout W2_t) * gelu'(u) (scratch fp32 [B, P, r]) and
// dz[b,t] += dout + du W1_t. Same blocking as the forward.
extern "C" __global__ void __launch_bounds__(128) adapter_bwd_tokens(
    const bf16* __restrict__ dout, const float* __restrict__ u, const float* __restrict__ w1,
    const float* __restrict__ w2, float* __restrict__ du, bf16* __restrict__ dz, uint32_t batch, uint32_t tokens,
    uint32_t d, uint32_t rank) {
    __shared__ float red[ADA_WARPS][ADA_GROUP * HEAD_MAX_RANK];
    __shared__ float dus[ADA_GROUP * HEAD_MAX_RANK];
    const uint32_t t = blockIdx.x;
    const uint32_t ch = threadIdx.x;
    const bool live = ch < d / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t nwarps = blockDim.x >> 5;
    const float* w1t = w1 + (uint64_t)t * rank * d;
    const float* w2t = w2 + ((uint64_t)t * d + ch * 8) * rank;
    const uint32_t b_end = min(batch, (blockIdx.y + 1) * ADA_IMAGES);
    for (uint32_t b0 = blockIdx.y * ADA_IMAGES; b0 < b_end; b0 += ADA_GROUP) {
        float gv[ADA_GROUP][8];
        load_image_group(dout, b0, b_end, tokens, t, d, ch, live, gv);
        for (uint32_t j = 0; j < rank; j++) {
            float wv[8];
#pragma unroll
            for (int v = 0; v < 8; v++) wv[v] = live ? w2t[v * rank + j] : 0.0f;
#pragma unroll
            for (int nb = 0; nb < ADA_GROUP; nb++) {
                float p = 0.0f;
#pragma unroll
                for (int v = 0; v < 8; v++) p = fmaf(gv[nb][v], wv[v], p);
                p = warp_sum(p);
                if (lane == 0) red[warp][nb * rank + j] = p;
            }
        }
        block_reduce_rank(red, dus, ADA_GROUP * rank, nwarps);
        for (uint32_t i = threadIdx.x; i < ADA_GROUP * rank; i += blockDim.x) {
            const uint32_t nb = i / rank, j = i % rank;
            if (b0 + nb < b_end) {
                const uint64_t ui = ((uint64_t)(b0 + nb) * tokens + t) * rank + j;
                const float g = dus[i] * gelu_grad_f(u[ui]);
                du[ui] = g;
                dus[i] = g;
            } else {
                dus[i] = 0.0f;
            }
        }
        __syncthreads();
        if (live) {
            float o[ADA_GROUP][8];
#pragma unroll
            for (int nb = 0; nb < ADA_GROUP; nb++)
#pragma unroll
                for (int v = 0; v < 8; v++) o[nb][v] = gv[nb][v];
            for (uint32_t j = 0; j < rank; j++) {
                float wv[8];
                load_f32<8>(w1t + (uint64_t)j * d + ch * 8, wv);
#pragma unroll
                for (int nb = 0; nb < ADA_GROUP; nb++) {
                    const float g = dus[nb * rank + j];
#pragma unroll
                    for (int v = 0; v < 8; v++) o[nb][v] = fmaf(g, wv[v], o[nb][v]);
                }
            }
#pragma unroll
            for (int nb = 0; nb < ADA_GROUP; nb++) {
                if (b0 + nb < b_end) {
                    bf16* p = dz + ((uint64_t)(b0 + nb) * tokens + t) * d + ch * 8;
                    float prev[8];
                    load_bf16<8>(p, prev);
#pragma unroll
                    for (int v = 0; v < 8; v++) prev[v] += o[nb][v];
                    store_bf16<8>(p, prev);
                }
            }
        }
        __syncthreads();
    }
}

// Parameter gradients of token t's adapter, block = token t and 256 columns (a lane owns 8),
// the 8 warps split the images, partials added in warp order through shared memory:
//   db2_t = sum_b dout,  dW2_t[c, j] = sum_b dout[c] gelu(u_j),  dW1_t[j, c] = sum_b du_j z[c],
//   db1_t[j] = sum_b du_j (column tile 0). Ranks go ADA_JG at a time (one pass over the images
//   each), so the accumulators stay in registers for any r.
constexpr int ADA_JG = 4;

extern "C" __global__ void __launch_bounds__(ROWS_WARPS * 32) adapter_bwd_params(
    const bf16* __restrict__ dout, const bf16* __restrict__ z, const float* __restrict__ u,
    const float* __restrict__ du, float* __restrict__ dw1, float* __restrict__ db1, float* __restrict__ dw2,
    float* __restrict__ db2, uint32_t batch, uint32_t tokens, uint32_t d, uint32_t rank) {
    __shared__ float part[ROWS_WARPS][257];
    const uint32_t t = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t ch = blockIdx.y * 32 + lane;
    const bool live = ch < d / 8;
    const uint32_t col0 = blockIdx.y * 256;
    for (uint32_t j0 = 0; j0 < rank; j0 += ADA_JG) {
        float a2[ADA_JG][8], a1[ADA_JG][8], ab[8];
#pragma unroll
        for (int v = 0; v < 8; v++) {
            ab[v] = 0.0f;
#pragma unroll
            for (int jj = 0; jj < ADA_JG; jj++) a2[jj][v] = a1[jj][v] = 0.0f;
        }
        if (live) {
#pragma unroll 2
            for (uint32_t b = warp; b < batch; b += ROWS_WARPS) {
                const uint64_t row = (uint64_t)b * tokens + t;
                float gv[8], zv[8];
                load_bf16<8>(dout + row * d + ch * 8, gv);
                load_bf16<8>(z + row * d + ch * 8, zv);
#pragma unroll
                for (int v = 0; v < 8; v++) ab[v] += gv[v];
#pragma unroll
                for (int jj = 0; jj < ADA_JG; jj++) {
                    if (j0 + jj < rank) {
                        const float gu = gelu_f(u[row * rank + j0 + jj]);
                        const float dv = du[row * rank + j0 + jj];
#pragma unroll
                        for (int v = 0; v < 8; v++) {
                            a2[jj][v] = fmaf(gv[v], gu, a2[jj][v]);
                            a1[jj][v] = fmaf(dv, zv[v], a1[jj][v]);
                        }
                    }
                }
            }
        }
        if (j0 == 0) add_warp_partials(part, ab, db2 + (uint64_t)t * d, 1, col0, d);
#pragma unroll
        for (int jj = 0; jj < ADA_JG; jj++) {
            if (j0 + jj < rank) {
                const uint32_t j = j0 + jj;
                add_warp_partials(part, a2[jj], dw2 + (uint64_t)t * d * rank + j, rank, col0, d);
                add_warp_partials(part, a1[jj], dw1 + ((uint64_t)t * rank + j) * d, 1, col0, d);
            }
        }
    }
    if (blockIdx.y == 0 && warp == 0) warp_column_sums(du + (uint64_t)t * rank, (uint64_t)tokens * rank, batch, rank, db1 + (uint64_t)t * rank);
}

// ------------------------------------------------------------------ plain-VPT head
// zbar[b, c] = (1/P) sum_t z[b, t, c] (fp32 [B, D], the GEMM's input; tokens summed in order).
extern "C" __global__ void vpt_mean(const bf16* __restrict__ z, float* __restrict__ zbar, uint32_t batch,
                                    uint32_t tokens, uint32_t d) {
    const uint64_t n = (uint64_t)batch * d;
    const float inv = 1.0f / (float)tokens;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        const uint64_t b = i / d, c = i % d;
        const bf16* zb = z + b * tokens * d + c;
        float s = 0.0f;
        for (uint32_t t = 0; t < tokens; t++) s += __bfloat162float(zb[(uint64_t)t * d]);
        zbar[i] = s * inv;
    }
}

// dz[b, t, c] = dzbar[b, c] / P (writes; bf16).
extern "C" __global__ void vpt_spread(const float* __restrict__ dzbar, bf16* __restrict__ dz, uint32_t batch,
                                      uint32_t tokens, uint32_t d) {
    const uint64_t n = (uint64_t)batch * tokens * d;
    const float inv = 1.0f / (float)tokens;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        const uint64_t b = i / ((uint64_t)tokens * d), c = i % d;
        dz[i] = __float2bfloat16_rn(dzbar[b * d + c] * inv);
    }
}

// out[c] = sum_r x[r, c], rows in order (the classifier bias gradient: dc = sum_b dy[b]).
extern "C" __global__ void column_sums(const float* __restrict__ x, float* __restrict__ out, uint32_t rows,
                                       uint32_t cols) {
    for (uint64_t c = global_thread(); c < cols; c += grid_threads()) {
        float s = 0.0f;
        for (uint32_t r = 0; r < rows; r++) s += x[(uint64_t)r * cols + c];
        out[c] = s;
    }
}

// ------------------------------------------------------------------ prediction
// y = (y+ + y-) / 2 and its probability sigmoid(y), elementwise
// (docs/MODEL.md#classifier-and-prediction).
extern "C" __global__ void head_predict(const float* __restrict__ y_pos, const float* __restrict__ y_neg,
                                        float* __restrict__ y, float* __restrict__ prob, uint64_t n) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        const float v = 0.5f * (y_pos[i] + y_neg[i]);
        y[i] = v;
        prob[i] = sigmoid_f(v);
    }
}
