// Shared device helpers for kernels/*.cu: bf16 vector loads/stores, warp and block reductions.
// Kernels are `extern "C"` so the host finds them by plain name (src/gpu/module.rs).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

#define FULL_MASK 0xffffffffu

// Butterfly sums: every lane ends with the same total, in a fixed order (deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// Fixed tree, so the result is the same on every run. `scratch` holds 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : T(0);
    return warp_sum(v);
}

// out[j] = sum over rows i < rows of x[i * stride + j], j < cols, by one warp (lanes split the
// rows; each sum's lane partials added by warp_sum, the same order every run). For the
// adapters' db1 = sum_b du[b, t, :].
__device__ __forceinline__ void warp_column_sums(const float* x, uint64_t stride, uint32_t rows, uint32_t cols,
                                                 float* out) {
    const int lane = threadIdx.x & 31;
    for (uint32_t j = 0; j < cols; j++) {
        float s = 0.0f;
        for (uint32_t i = lane; i < rows; i += 32) s += x[(uint64_t)i * stride + j];
        s = warp_sum(s);
        if (lane == 0) out[j] = s;
    }
}

// VEC consecutive bf16 -> float. VEC = 8 is one 16-byte load (pointer 16-byte aligned).
template <int VEC>
__device__ __forceinline__ void load_bf16(const bf16* p, float (&o)[VEC]) {
    if constexpr (VEC == 8) {
        uint4 raw = *reinterpret_cast<const uint4*>(p);
        const bf162* h = reinterpret_cast<const bf162*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(h[k]);
            o[2 * k] = f.x;
            o[2 * k + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) o[k] = __bfloat162float(p[k]);
    }
}

// float -> VEC consecutive bf16, round to nearest even.
template <int VEC>
__device__ __forceinline__ void store_bf16(bf16* p, const float (&v)[VEC]) {
    if constexpr (VEC == 8) {
        uint4 raw;
        bf162* h = reinterpret_cast<bf162*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        *reinterpret_cast<uint4*>(p) = raw;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) p[k] = __float2bfloat16_rn(v[k]);
    }
}

// VEC consecutive floats; VEC = 8 is two 16-byte loads (pointer 16-byte aligned).
template <int VEC>
__device__ __forceinline__ void load_f32(const float* p, float (&o)[VEC]) {
    if constexpr (VEC == 8) {
        float4 a = reinterpret_cast<const float4*>(p)[0];
        float4 b = reinterpret_cast<const float4*>(p)[1];
        o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
        o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) o[k] = p[k];
    }
}

// VEC consecutive floats from fp32; VEC = 8 is two 16-byte stores (pointer 16-byte aligned).
template <int VEC>
__device__ __forceinline__ void store_f32(float* p, const float (&v)[VEC]) {
    if constexpr (VEC == 8) {
        reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) p[k] = v[k];
    }
}

// The loads and stores above by storage type, for kernels templated over it (fp32 math
// over bf16 or fp32 storage).
template <int VEC>
__device__ __forceinline__ void load_vec(const bf16* p, float (&o)[VEC]) { load_bf16<VEC>(p, o); }
template <int VEC>
__device__ __forceinline__ void load_vec(const float* p, float (&o)[VEC]) { load_f32<VEC>(p, o); }
template <int VEC>
__device__ __forceinline__ void store_vec(bf16* p, const float (&v)[VEC]) { store_bf16<VEC>(p, v); }
template <int VEC>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[VEC]) { store_f32<VEC>(p, v); }

__device__ __forceinline__ uint64_t global_thread() {
    return (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ uint64_t grid_threads() { return (uint64_t)gridDim.x * blockDim.x; }

// Exact (erf) GELU and its derivative, fp32 (gelu.cu; the head's adapters).
__device__ __forceinline__ float gelu_f(float h) {
    return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f));
}
__device__ __forceinline__ float gelu_grad_f(float h) {
    return 0.5f * (1.0f + erff(h * 0.70710678118654752f)) +
           h * expf(-0.5f * h * h) * 0.39894228040143268f;
}

// log(sigmoid(x)) from the logit, stable for any |x|, and sigmoid without overflow
// (asl.cu; the head's prediction).
__device__ __forceinline__ float log_sigmoid(float x) { return fminf(x, 0.0f) - log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid_f(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

// The column of element `start`, `start + stride`, ... of a row-major matrix with `cols`
// columns, without a modulo per step: the column advances by stride % cols and wraps once.
struct ColumnWalk {
    uint32_t c, step, cols;
    __device__ __forceinline__ ColumnWalk(uint64_t start, uint64_t stride, uint32_t cols_)
        : c((uint32_t)(start % cols_)), step((uint32_t)(stride % cols_)), cols(cols_) {}
    __device__ __forceinline__ void next() {
        c += step;
        if (c >= cols) c -= cols;
    }
};
