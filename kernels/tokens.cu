// Token assembly and small elementwise ops of the CUDA backend (src/backend/cuda.rs),
// grid-stride over output elements, fp32 math over fp32 or bf16 storage (below). Launchers:
// src/ops/tokens/cuda.rs; CPU twins: the CpuBackend ops of the same names (src/backend/cpu.rs).
// Also a plain fp32 attention used for head dims the fused kernels (attention.cu) do not cover.
#include "common.cuh"

// Dynamic shared memory of a block.
#ifndef DYNAMIC_SMEM
#define DYNAMIC_SMEM(name) extern __shared__ float name[]
#endif

// Storage: the activations a kernel reads or writes may be fp32 or bf16 (the backend's
// precision, src/backend/cuda.rs); the math is fp32 either way. Kernels whose operands vary
// are templates over the storage type, instantiated once per type as `<name>_f32` /
// `<name>_bf16` (the suffix names the varying operand's type; see each kernel).
__device__ __forceinline__ float ldf(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float ldf(const bf16* p, uint64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void stf(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void stf(bf16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// An extern "C" instantiation NAME_S of template kernel body NAME##_t<T> (PARAMS: the
// kernel's parameter list with T; ARGS: the names passed on).
#define TOK_INSTANCE(NAME, S, T, PARAMS, ARGS) \
    extern "C" __global__ void NAME##_##S PARAMS { NAME##_t<T> ARGS; }
#define TOK_BOTH(NAME, PARAMS_F, PARAMS_B, ARGS) \
    TOK_INSTANCE(NAME, f32, float, PARAMS_F, ARGS) TOK_INSTANCE(NAME, bf16, bf16, PARAMS_B, ARGS)

// out[b, p, (c*P + ky)*P + kx] = img[b, c, py*P + ky, px*P + kx], p = py*gw + px.
// T: images and out (a copy: no rounding within one type).
template <typename T>
__device__ __forceinline__ void tok_patchify_t(const T* __restrict__ img, T* __restrict__ out, uint64_t n, uint32_t c,
                                               uint32_t h, uint32_t w, uint32_t p) {
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
#define PATCHIFY_PARAMS(T) (const T* __restrict__ img, T* __restrict__ out, uint64_t n, uint32_t c, uint32_t h, uint32_t w, uint32_t p)
TOK_BOTH(tok_patchify, PATCHIFY_PARAMS(float), PATCHIFY_PARAMS(bf16), (img, out, n, c, h, w, p))

// x[b, 0] = cls + pos[0]; x[b, 1+P+i] = patches[b, i] + pos[1+i]; prompt rows untouched.
// T: patches (the patch-embedding GEMM's output); x, cls, pos are fp32.
template <typename T>
__device__ __forceinline__ void tok_embed_t(const T* __restrict__ patches, const float* __restrict__ cls,
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
            x[(b * tokens + prompts + t) * d + j] = ldf(patches, (b * np + t - 1) * d + j) + pos[(uint64_t)t * d + j];
        }
    }
}
#define EMBED_PARAMS(T)                                                                                        \
    (const T* __restrict__ patches, const float* __restrict__ cls, const float* __restrict__ pos,            \
     float* __restrict__ x, uint64_t n, uint32_t np, uint32_t prompts, uint32_t d)
TOK_BOTH(tok_embed, EMBED_PARAMS(float), EMBED_PARAMS(bf16), (patches, cls, pos, x, n, np, prompts, d))

// x[b, 1+j] = prompts[j] (prompts already offset to the layer) for n = B*P*D elements.
// fp32 only: prompts are trainable parameters, x the residual stream.
extern "C" __global__ void tok_set_prompts(const float* __restrict__ prompts, float* __restrict__ x, uint64_t n,
                                           uint32_t tokens, uint32_t count, uint32_t d) {
    const uint64_t per = (uint64_t)count * d;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / per, r = i % per;
        x[(b * tokens + 1) * d + r] = prompts[r];
    }
}

// dprompts[r] = sum_b dx[b, 1 + r/D, r%D] in image order, for r < P*D (deterministic).
// fp32 only: dx is the residual stream's gradient, dprompts a parameter gradient.
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

// dst[b, ds + j] = src[b, ss + j] for rows of D, n = B*count*D. T: src and dst
// (CopyTokensParams: src/contract.rs).
template <typename T>
__device__ __forceinline__ void tok_copy_tokens_t(const CopyTokensParams& p) {
    const T* __restrict__ src = static_cast<const T*>(p.src);
    T* __restrict__ dst = static_cast<T*>(p.dst);
    const uint64_t n = p.n;
    const uint32_t src_tokens = p.src_tokens, src_start = p.src_start, dst_tokens = p.dst_tokens,
                   dst_start = p.dst_start, d = p.d;
    const uint64_t per = (uint64_t)p.count * d;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / per, r = i % per;
        dst[(b * dst_tokens + dst_start) * d + r] = src[(b * src_tokens + src_start) * d + r];
    }
}
TOK_BOTH(tok_copy_tokens, (const CopyTokensParams p), (const CopyTokensParams p), (p))

// out = x + ls * f (ls [D] broadcast over rows, or none). T: f (a projection's output); x and
// out are the fp32 residual stream.
template <typename T>
__device__ __forceinline__ void tok_residual_t(const float* __restrict__ x, const T* __restrict__ f,
                                               const float* __restrict__ ls, float* __restrict__ out, uint64_t n,
                                               uint32_t d) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads())
        out[i] = ls ? x[i] + ls[i % d] * ldf(f, i) : x[i] + ldf(f, i);
}
#define RESIDUAL_PARAMS(T)                                                                                     \
    (const float* __restrict__ x, const T* __restrict__ f, const float* __restrict__ ls, float* __restrict__ out, \
     uint64_t n, uint32_t d)
TOK_BOTH(tok_residual, RESIDUAL_PARAMS(float), RESIDUAL_PARAMS(bf16), (x, f, ls, out, n, d))

// out = src * v (v [D] broadcast over rows). T: out (a GEMM operand); src (the residual
// stream's gradient) and v are fp32.
template <typename T>
__device__ __forceinline__ void tok_mul_cols_t(const float* __restrict__ src, const float* __restrict__ v,
                                               T* __restrict__ out, uint64_t n, uint32_t d) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) stf(out, i, src[i] * v[i % d]);
}
#define MUL_COLS_PARAMS(T) (const float* __restrict__ src, const float* __restrict__ v, T* __restrict__ out, uint64_t n, uint32_t d)
TOK_BOTH(tok_mul_cols, MUL_COLS_PARAMS(float), MUL_COLS_PARAMS(bf16), (src, v, out, n, d))

// y = a*y + b*x in fp32, any storage of y (Y) and x (X): tok_axpby_<Y>_<X> (adding a bf16
// kernel result into an fp32 gradient is one launch).
template <typename Y, typename X>
__device__ __forceinline__ void tok_axpby_t(float a, Y* __restrict__ y, float b, const X* __restrict__ x, uint64_t n) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) stf(y, i, a * ldf(y, i) + b * ldf(x, i));
}
#define AXPBY(SY, Y, SX, X)                                                                                    \
    extern "C" __global__ void tok_axpby_##SY##_##SX(float a, Y* __restrict__ y, float b, const X* __restrict__ x, \
                                                     uint64_t n) {                                              \
        tok_axpby_t<Y, X>(a, y, b, x, n);                                                                      \
    }
AXPBY(f32, float, f32, float)
AXPBY(f32, float, bf16, bf16)
AXPBY(bf16, bf16, f32, float)
AXPBY(bf16, bf16, bf16, bf16)

// y = value. T: y.
template <typename T>
__device__ __forceinline__ void tok_fill_t(T* __restrict__ y, float value, uint64_t n) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) stf(y, i, value);
}
TOK_BOTH(tok_fill, (float* __restrict__ y, float value, uint64_t n), (bf16* __restrict__ y, float value, uint64_t n),
         (y, value, n))

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

// qkv [B, N, 3, h, dh]; out [B, Nq, D]; lse [B, h, Nq] (PlainAttnParams: src/contract.rs).
extern "C" __global__ void attn_simple_fwd(const PlainAttnParams p) {
    const float* __restrict__ qkv = p.qkv;
    float* __restrict__ out = p.out;
    float* __restrict__ lse = p.lse;
    const int n = p.n, h = p.h, dh = p.dh, ps = p.ps, pe = p.pe, q0 = p.q0, nq = p.nq;
    const float scale = p.scale;
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
extern "C" __global__ void attn_simple_bwd(const PlainAttnParams p) {
    const float* __restrict__ qkv = p.qkv;
    const float* __restrict__ out = p.out;
    const float* __restrict__ lse = p.lse;
    const float* __restrict__ dout = p.dout;
    float* __restrict__ dqkv = p.dqkv;
    const int n = p.n, h = p.h, dh = p.dh, ps = p.ps, pe = p.pe, q0 = p.q0, nq = p.nq;
    const float scale = p.scale;
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
