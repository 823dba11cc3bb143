// LayerNorm over rows of length d <= 1024: input x of storage type S (bf16, or fp32 for a
// residual stream kept in fp32: read directly, no cast pass), output y bf16, fp32 gamma/beta,
// fp32 statistics; the backward writes dx in x's type S (an fp32 residual gradient is
// accumulated in fp32, never rounded to bf16).
// One warp per row; the row stays in registers (32 floats per lane) between the two passes, so
// x is read once. Sums are warp butterflies in a fixed order (deterministic).
//   forward   y = (x - mean) rstd gamma + beta, rstd = 1/sqrt(var + eps) (biased var);
//             saves mean, rstd per row.
//   backward  dx (+)= rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma (input grad only:
//             the backbone's norms are frozen). dx may alias dy when S is bf16.
// VEC = 8: 16-byte loads (d % 8 == 0, aligned pointers; the launcher checks), compiled for
// NCH = 1..4 chunks of 8 per lane (d <= 256 NCH), so a 768-wide row holds 24 floats per lane,
// not 32: fewer registers, more resident warps. VEC = 1: any d <= 1024, 32 values per lane.
// Kernel names: layernorm_{fwd,bwd}_bf16[_v8_cN] (S = bf16) and layernorm_{fwd,bwd}_f32x[_v8_cN]
// (S = fp32).
// layernorm_res_fwd_{f32,bf16}[_v8_cN]: the residual add out = x + ls * f fused into the forward
// (fp32 x and out, f stored as named), one pass instead of two.
#include "common.cuh"

// The forward over rows, one warp per row: `load(off, c, v)` fills chunk c (VEC values) of the
// row that starts at element `off` into registers; the rest normalises them (two passes over
// the registers: mean, then variance) into y and saves mean, rstd. The kernels below differ
// only in what they load.
template <int VEC, int NCH, typename Load>
__device__ __forceinline__ void layernorm_fwd_rows(Load load, const float* __restrict__ gamma,
                                                   const float* __restrict__ beta, bf16* __restrict__ y,
                                                   float* __restrict__ mean, float* __restrict__ rstd,
                                                   uint32_t rows, uint32_t d, float eps) {
    // NCH chunks of VEC elements per lane; the row has nch <= 32 * NCH chunks.
    const int lane = threadIdx.x & 31;
    const uint32_t warps = blockDim.x >> 5;
    const uint32_t nch = d / VEC;
    const float inv_d = 1.0f / (float)d;
    for (uint32_t row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
        const uint64_t off = (uint64_t)row * d;
        float v[NCH][VEC];
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            const uint32_t c = lane + 32 * i;
            if (c < nch) {
                load(off, c, v[i]);
#pragma unroll
                for (int k = 0; k < VEC; k++) s += v[i][k];
            }
        }
        const float mu = warp_sum(s) * inv_d;
        float q = 0.0f;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            if (lane + 32 * i < nch) {
#pragma unroll
                for (int k = 0; k < VEC; k++) {
                    const float t = v[i][k] - mu;
                    q = fmaf(t, t, q);
                }
            }
        }
        const float rs = 1.0f / sqrtf(warp_sum(q) * inv_d + eps);
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            const uint32_t c = lane + 32 * i;
            if (c < nch) {
                float g[VEC], b[VEC];
                load_f32<VEC>(gamma + c * VEC, g);
                load_f32<VEC>(beta + c * VEC, b);
#pragma unroll
                for (int k = 0; k < VEC; k++) v[i][k] = fmaf((v[i][k] - mu) * rs, g[k], b[k]);
                store_bf16<VEC>(y + off + c * VEC, v[i]);
            }
        }
        if (lane == 0) {
            mean[row] = mu;
            rstd[row] = rs;
        }
    }
}

template <int VEC, int NCH, typename S>
__device__ __forceinline__ void layernorm_fwd(const S* __restrict__ x, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, bf16* __restrict__ y,
                                              float* __restrict__ mean, float* __restrict__ rstd,
                                              uint32_t rows, uint32_t d, float eps) {
    auto load = [=](uint64_t off, uint32_t c, float (&v)[VEC]) { load_vec<VEC>(x + off + c * VEC, v); };
    layernorm_fwd_rows<VEC, NCH>(load, gamma, beta, y, mean, rstd, rows, d, eps);
}

// Residual add fused into the forward: out = x + ls * f (ls [d] or null: out = x + f), then
// LayerNorm of out, in one pass (out is written and normalised from registers, not read back).
// x and out are the fp32 residual stream; F is the branch output's storage (bf16 or fp32).
// The sum is the CPU twin's `x + l * f` (CpuBackend::residual).
template <int VEC, int NCH, typename F>
__device__ __forceinline__ void layernorm_res_fwd(const float* __restrict__ x, const F* __restrict__ f,
                                                  const float* __restrict__ ls, float* __restrict__ out,
                                                  const float* __restrict__ gamma, const float* __restrict__ beta,
                                                  bf16* __restrict__ y, float* __restrict__ mean,
                                                  float* __restrict__ rstd, uint32_t rows, uint32_t d, float eps) {
    auto load = [=](uint64_t off, uint32_t c, float (&v)[VEC]) {
        float fv[VEC];
        load_f32<VEC>(x + off + c * VEC, v);
        load_vec<VEC>(f + off + c * VEC, fv);
        if (ls) {
            float l[VEC];
            load_f32<VEC>(ls + c * VEC, l);
#pragma unroll
            for (int k = 0; k < VEC; k++) v[k] = v[k] + l[k] * fv[k];
        } else {
#pragma unroll
            for (int k = 0; k < VEC; k++) v[k] = v[k] + fv[k];
        }
        store_f32<VEC>(out + off + c * VEC, v);
    };
    layernorm_fwd_rows<VEC, NCH>(load, gamma, beta, y, mean, rstd, rows, d, eps);
}

template <int VEC, int NCH, typename S>
__device__ __forceinline__ void layernorm_bwd(const bf16* dy, const S* __restrict__ x,
                                              const float* __restrict__ gamma, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, S* dx, uint32_t rows,
                                              uint32_t d, int accumulate) {
    const int lane = threadIdx.x & 31;
    const uint32_t warps = blockDim.x >> 5;
    const uint32_t nch = d / VEC;
    const float inv_d = 1.0f / (float)d;
    for (uint32_t row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
        const uint64_t off = (uint64_t)row * d;
        const float mu = mean[row], rs = rstd[row];
        float g[NCH][VEC], xh[NCH][VEC];  // g = dy * gamma, xh = xhat
        float sg = 0.0f, sgx = 0.0f;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            const uint32_t c = lane + 32 * i;
            if (c < nch) {
                float gm[VEC];
                load_bf16<VEC>(dy + off + c * VEC, g[i]);
                load_vec<VEC>(x + off + c * VEC, xh[i]);
                load_f32<VEC>(gamma + c * VEC, gm);
#pragma unroll
                for (int k = 0; k < VEC; k++) {
                    g[i][k] *= gm[k];
                    xh[i][k] = (xh[i][k] - mu) * rs;
                    sg += g[i][k];
                    sgx = fmaf(g[i][k], xh[i][k], sgx);
                }
            }
        }
        const float mg = warp_sum(sg) * inv_d;
        const float mgx = warp_sum(sgx) * inv_d;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            const uint32_t c = lane + 32 * i;
            if (c < nch) {
                float out[VEC];
#pragma unroll
                for (int k = 0; k < VEC; k++) out[k] = rs * (g[i][k] - mg - xh[i][k] * mgx);
                if (accumulate) {
                    float prev[VEC];
                    load_vec<VEC>(dx + off + c * VEC, prev);
#pragma unroll
                    for (int k = 0; k < VEC; k++) out[k] += prev[k];
                }
                store_vec<VEC>(dx + off + c * VEC, out);
            }
        }
    }
}

#define LN_FWD(NAME, VEC, NCH, S)                                                                  \
    extern "C" __global__ void NAME(const S* x, const float* gamma, const float* beta, bf16* y,      \
                                    float* mean, float* rstd, uint32_t rows, uint32_t d, float eps) { \
        layernorm_fwd<VEC, NCH, S>(x, gamma, beta, y, mean, rstd, rows, d, eps);                     \
    }
#define LN_BWD(NAME, VEC, NCH, S)                                                                  \
    extern "C" __global__ void NAME(const bf16* dy, const S* x, const float* gamma,                 \
                                    const float* mean, const float* rstd, S* dx, uint32_t rows,     \
                                    uint32_t d, int accumulate) {                                   \
        layernorm_bwd<VEC, NCH, S>(dy, x, gamma, mean, rstd, dx, rows, d, accumulate);               \
    }
// Every kernel of one storage type S, named layernorm_{fwd,bwd}_SUFFIX[_v8_cN].
// The v8 families come in 1..4 chunks of 256 columns a row (32 lanes x 8) and VEC = 1 holds 32
// values a lane: both reach the launcher's LN_MAX_D (src/contract.rs), no further.
static_assert(LN_MAX_D == 4 * 32 * 8, "LN_MAX_D must match the widest v8 family (c4) and VEC = 1's 32 values a lane");
#define LN_ALL(SUFFIX, S)                                     \
    LN_FWD(layernorm_fwd_##SUFFIX, 1, 32, S)                  \
    LN_FWD(layernorm_fwd_##SUFFIX##_v8_c1, 8, 1, S)           \
    LN_FWD(layernorm_fwd_##SUFFIX##_v8_c2, 8, 2, S)           \
    LN_FWD(layernorm_fwd_##SUFFIX##_v8_c3, 8, 3, S)           \
    LN_FWD(layernorm_fwd_##SUFFIX##_v8_c4, 8, 4, S)           \
    LN_BWD(layernorm_bwd_##SUFFIX, 1, 32, S)                  \
    LN_BWD(layernorm_bwd_##SUFFIX##_v8_c1, 8, 1, S)           \
    LN_BWD(layernorm_bwd_##SUFFIX##_v8_c2, 8, 2, S)           \
    LN_BWD(layernorm_bwd_##SUFFIX##_v8_c3, 8, 3, S)           \
    LN_BWD(layernorm_bwd_##SUFFIX##_v8_c4, 8, 4, S)

LN_ALL(bf16, bf16)
LN_ALL(f32x, float)

#define LN_RES_FWD(NAME, VEC, NCH, F)                                                                        \
    extern "C" __global__ void NAME(const float* x, const F* f, const float* ls, float* out, const float* gamma, \
                                    const float* beta, bf16* y, float* mean, float* rstd, uint32_t rows,        \
                                    uint32_t d, float eps) {                                                    \
        layernorm_res_fwd<VEC, NCH, F>(x, f, ls, out, gamma, beta, y, mean, rstd, rows, d, eps);                \
    }
// layernorm_res_fwd_SUFFIX[_v8_cN]: the branch output f stored as F.
#define LN_RES_ALL(SUFFIX, F)                                   \
    LN_RES_FWD(layernorm_res_fwd_##SUFFIX, 1, 32, F)            \
    LN_RES_FWD(layernorm_res_fwd_##SUFFIX##_v8_c1, 8, 1, F)     \
    LN_RES_FWD(layernorm_res_fwd_##SUFFIX##_v8_c2, 8, 2, F)     \
    LN_RES_FWD(layernorm_res_fwd_##SUFFIX##_v8_c3, 8, 3, F)     \
    LN_RES_FWD(layernorm_res_fwd_##SUFFIX##_v8_c4, 8, 4, F)

LN_RES_ALL(f32, float)
LN_RES_ALL(bf16, bf16)
