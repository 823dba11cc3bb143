// Token assembly and small elementwise ops of the CUDA backend (src/backend/cuda.rs), fp32,
// grid-stride over output elements. Launchers: src/ops/tokens/cuda.rs; CPU twins: the
// CpuBackend ops of the same names (src/backend/cpu.rs). Also a plain fp32 attention used for
// head dims the fused kernels (attention.cu) do not cover.
#include "common.cuh"

// Dynamic shared memory of a block (the CPU emulator, tests/cuda_emu, defines its own).
#ifndef DYNAMIC_SMEM
#define DYNAMIC_SMEM(name) extern __shared__ float name[]
#endif

// out[b, p, (c*P + ky)*P + kx] = img[b, c, py*P + ky, px*P + kx], p = py*gw + px.
extern "C" __global__ void tok_patchify(const float* __restrict__ img, float* __restrict__ out, uint64_t n,
                                        uint32_t c, uint32_t h, uint32_t w, uint32_t p) {
    const uint32_t gw = w / p, np = (h / p) * gw, row = c * p * p;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / ((uint64_t)np * row);
        uint32_t r = (uint32_t)(i % ((uint64_t)np * row));
        uint32_t pi = r / row, e = r % row;
        uint32_t ci = e / (p * p), ky = (e / p) % p, kx = e % p;
        uint32_t py = pi / gw, px = pi % gw;
        out[i] = img[((b * c + ci) * h + py * p + ky) * (uint64_t)w + px * p + kx];
    }
}

// x[b, 0] = cls + pos[0]; x[b, 1+P+i] = patches[b, i] + pos[1+i]; prompt rows untouched.
extern "C" __global__ void tok_embed(const float* __restrict__ patches, const float* __restrict__ cls,
                                     const float* __restrict__ pos, float* __restrict__ x, uint64_t n,
                                     uint32_t np, uint32_t prompts, uint32_t d) {
    // n = B * (1 + Np) * D: the rows written.
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / ((uint64_t)(1 + np) * d);
        uint32_t r = (uint32_t)(i % ((uint64_t)(1 + np) * d));
        uint32_t t = r / d, j = r % d;
        uint64_t tokens = 1 + prompts + np;
        if (t == 0) {
            x[b * tokens * d + j] = cls[j] + pos[j];
        } else {
            x[(b * tokens + prompts + t) * d + j] = patches[(b * np + t - 1) * d + j] + pos[(uint64_t)t * d + j];
        }
    }
}

// x[b, 1+j] = prompts[j] (prompts already offset to the layer) for n = B*P*D elements.
extern "C" __global__ void tok_set_prompts(const float* __restrict__ prompts, float* __restrict__ x, uint64_t n,
                                           uint32_t tokens, uint32_t count, uint32_t d) {
    const uint64_t per = (uint64_t)count * d;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / per, r = i % per;
        x[(b * tokens + 1) * d + r] = prompts[r];
    }
}

// dprompts[r] = sum_b dx[b, 1 + r/D, r%D] in image order, for r < P*D (deterministic).
extern "C" __global__ void tok_prompt_grad(const float* __restrict__ dx, float* __restrict__ dp, uint64_t n,
                                           uint32_t batch, uint32_t tokens, uint32_t d) {
    for (uint64_t r = global_thread(); r < n; r += grid_threads()) {
        float s = 0.f;
        for (uint32_t b = 0; b < batch; ++b) s += dx[((uint64_t)b * tokens + 1) * d + r];
        dp[r] = s;
    }
}

// dx[b, 1+j] = 0 for n = B*P*D elements.
extern "C" __global__ void tok_zero_prompts(float* __restrict__ dx, uint64_t n, uint32_t tokens, uint32_t count,
                                            uint32_t d) {
    const uint64_t per = (uint64_t)count * d;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / per, r = i % per;
        dx[(b * tokens + 1) * d + r] = 0.f;
    }
}

// dst[b, ds + j] = src[b, ss + j] for rows of D, n = B*count*D.
extern "C" __global__ void tok_copy_tokens(const float* __restrict__ src, float* __restrict__ dst, uint64_t n,
                                           uint32_t src_tokens, uint32_t src_start, uint32_t dst_tokens,
                                           uint32_t dst_start, uint32_t count, uint32_t d) {
    const uint64_t per = (uint64_t)count * d;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / per, r = i % per;
        dst[(b * dst_tokens + dst_start) * d + r] = src[(b * src_tokens + src_start) * d + r];
    }
}

// out = x + ls * f (ls [D] broadcast over rows, or none).
extern "C" __global__ void tok_residual(const float* __restrict__ x, const float* __restrict__ f,
                                        const float* __restrict__ ls, float* __restrict__ out, uint64_t n,
                                        uint32_t d) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads())
        out[i] = ls ? x[i] + ls[i % d] * f[i] : x[i] + f[i];
}

// out = src * v (v [D] broadcast over rows).
extern "C" __global__ void tok_mul_cols(const float* __restrict__ src, const float* __restrict__ v,
                                        float* __restrict__ out, uint64_t n, uint32_t d) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) out[i] = src[i] * v[i % d];
}

// y = a*y + b*x.
extern "C" __global__ void tok_axpby(float a, float* __restrict__ y, float b, const float* __restrict__ x,
                                     uint64_t n) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) y[i] = a * y[i] + b * x[i];
}

// y = value.
extern "C" __global__ void tok_fill(float* __restrict__ y, float value, uint64_t n) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) y[i] = value;
}

// ---- plain fp32 attention (any head dim) ------------------------------------------------------
// One block per (query, image*head); the scores of the row live in shared memory (N floats,
// twice in the backward). Mask as AttnShape::allowed: a prompt query skips the other prompts.

__device__ __forceinline__ bool attn_allowed(int i, int j, int ps, int pe) {
    return i == j || !(i >= ps && i < pe && j >= ps && j < pe);
}

__device__ float block_max_f(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int w = 0; w < nwarps; ++w) r = fmaxf(r, scratch[w]);
    return r;
}

__device__ float block_sum_f(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < nwarps; ++w) r += scratch[w];
    return r;
}

// qkv [B, N, 3, h, dh]; out [B, Nq, D]; lse [B, h, Nq].
extern "C" __global__ void attn_simple_fwd(const float* __restrict__ qkv, float* __restrict__ out,
                                           float* __restrict__ lse, int n, int h, int dh, int ps, int pe, int q0,
                                           int nq, float scale) {
    DYNAMIC_SMEM(s);  // [n] scores, then 32 reduction slots
    float* red = s + n;
    const int qi = blockIdx.x, bh = blockIdx.y, b = bh / h, hd = bh % h, d = h * dh, i = q0 + qi;
    const float* base = qkv + (uint64_t)b * n * 3 * d + hd * dh;
    const float* q = base + (uint64_t)i * 3 * d;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = -INFINITY;
        if (attn_allowed(i, j, ps, pe)) {
            const float* k = base + (uint64_t)j * 3 * d + d;
            float acc = 0.f;
            for (int c = 0; c < dh; ++c) acc += q[c] * k[c];
            v = acc * scale;
        }
        s[j] = v;
        mx = fmaxf(mx, v);
    }
    mx = block_max_f(mx, red);
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = __expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    sum = block_sum_f(sum, red);
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
extern "C" __global__ void attn_simple_bwd(const float* __restrict__ qkv, const float* __restrict__ out,
                                           const float* __restrict__ lse, const float* __restrict__ dout,
                                           float* __restrict__ dqkv, int n, int h, int dh, int ps, int pe, int q0,
                                           int nq, float scale) {
    DYNAMIC_SMEM(s);  // [n] probabilities, [n] dS, 32 reduction slots
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
    dd = block_sum_f(dd, red);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float p = 0.f, g = 0.f;
        if (attn_allowed(i, j, ps, pe)) {
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
