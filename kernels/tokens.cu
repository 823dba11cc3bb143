// Token assembly and small elementwise ops of the CUDA backend (src/backend/cuda.rs),
// grid-stride over output elements, fp32 math over fp32 or bf16 storage (below). Launchers:
// src/ops/tokens/cuda.rs; CPU twins: the CpuBackend ops of the same names (src/backend/cpu.rs).
#include "common.cuh"

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

// x[b, 0] = cls + pos[0]; x[b, 1+i] = patches[b, i] + pos[1+i]; the prompt rows (the last P of
// each image, src/ops/tokens/mod.rs) untouched.
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
        float v = t == 0 ? cls[j] : ldf(patches, (b * np + t - 1) * d + j);
        x[(b * tokens + t) * d + j] = v + pos[(uint64_t)t * d + j];
    }
}
#define EMBED_PARAMS(T)                                                                                        \
    (const T* __restrict__ patches, const float* __restrict__ cls, const float* __restrict__ pos,            \
     float* __restrict__ x, uint64_t n, uint32_t np, uint32_t prompts, uint32_t d)
TOK_BOTH(tok_embed, EMBED_PARAMS(float), EMBED_PARAMS(bf16), (patches, cls, pos, x, n, np, prompts, d))

// x[b, N-P+j] = prompts[j] (prompts already offset to the layer) for n = B*P*D elements.
// fp32 only: prompts are trainable parameters, x the residual stream.
extern "C" __global__ void tok_set_prompts(const float* __restrict__ prompts, float* __restrict__ x, uint64_t n,
                                           uint32_t tokens, uint32_t count, uint32_t d) {
    const uint64_t per = (uint64_t)count * d;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / per, r = i % per;
        x[(b * tokens + tokens - count) * d + r] = prompts[r];
    }
}

// dprompts[r] = sum_b dx[b, N-P + r/D, r%D] in image order, for r < n = P*D (deterministic).
// fp32 only: dx is the residual stream's gradient, dprompts a parameter gradient.
extern "C" __global__ void tok_prompt_grad(const float* __restrict__ dx, float* __restrict__ dp, uint64_t n,
                                           uint32_t batch, uint32_t tokens, uint32_t d) {
    for (uint64_t r = global_thread(); r < n; r += grid_threads()) {
        float s = 0.f;
        for (uint32_t b = 0; b < batch; ++b) s += dx[((uint64_t)b * tokens + tokens - n / d) * d + r];
        dp[r] = s;
    }
}

// dx[b, N-P+j] = 0 for n = B*P*D elements.
extern "C" __global__ void tok_zero_prompts(float* __restrict__ dx, uint64_t n, uint32_t tokens, uint32_t count,
                                            uint32_t d) {
    const uint64_t per = (uint64_t)count * d;
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        uint64_t b = i / per, r = i % per;
        dx[(b * tokens + tokens - count) * d + r] = 0.f;
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
