// Bias + exact (erf) GELU over a row-major [rows, cols] bf16 matrix, fp32 math:
//   forward   h = x + b[col], y = gelu(h) = h/2 (1 + erf(h/sqrt2))
//   backward  dx = dy * gelu'(h),  gelu'(h) = (1 + erf(h/sqrt2))/2 + h exp(-h^2/2)/sqrt(2 pi)
// x is the pre-bias input the forward saw (the GEMM output); the bias is fp32 and may be null.
// dx may alias dy. Grid-stride; `_v8` handles eight elements per step (cols % 8 == 0, 16-byte
// aligned pointers; the launcher checks), the plain variant any shape. The bias column advances
// by a fixed step per grid-stride iteration, so only the first needs a (64-bit) modulo.
#include "common.cuh"

// gelu_f, gelu_grad_f: common.cuh (the head's adapters use them too).

extern "C" __global__ void gelu_bias_fwd_bf16(const bf16* __restrict__ x, const float* __restrict__ bias,
                                              bf16* __restrict__ y, uint64_t rows, uint32_t cols) {
    const uint64_t n = rows * cols;
    ColumnWalk col(global_thread(), grid_threads(), cols);
    for (uint64_t i = global_thread(); i < n; i += grid_threads(), col.next()) {
        const float h = __bfloat162float(x[i]) + (bias ? bias[col.c] : 0.0f);
        y[i] = __float2bfloat16_rn(gelu_f(h));
    }
}

extern "C" __global__ void gelu_bias_fwd_bf16_v8(const bf16* __restrict__ x, const float* __restrict__ bias,
                                                 bf16* __restrict__ y, uint64_t rows, uint32_t cols) {
    const uint64_t n8 = rows * cols / 8;
    ColumnWalk col(8 * global_thread(), 8 * grid_threads(), cols);
    for (uint64_t i = global_thread(); i < n8; i += grid_threads(), col.next()) {
        float h[8], b[8];
        load_bf16<8>(x + 8 * i, h);
        if (bias) {
            load_f32<8>(bias + col.c, b);
#pragma unroll
            for (int k = 0; k < 8; k++) h[k] += b[k];
        }
#pragma unroll
        for (int k = 0; k < 8; k++) h[k] = gelu_f(h[k]);
        store_bf16<8>(y + 8 * i, h);
    }
}

extern "C" __global__ void gelu_bias_bwd_bf16(const bf16* __restrict__ x, const float* __restrict__ bias,
                                              const bf16* dy, bf16* dx, uint64_t rows, uint32_t cols) {
    const uint64_t n = rows * cols;
    ColumnWalk col(global_thread(), grid_threads(), cols);
    for (uint64_t i = global_thread(); i < n; i += grid_threads(), col.next()) {
        const float h = __bfloat162float(x[i]) + (bias ? bias[col.c] : 0.0f);
        dx[i] = __float2bfloat16_rn(__bfloat162float(dy[i]) * gelu_grad_f(h));
    }
}

extern "C" __global__ void gelu_bias_bwd_bf16_v8(const bf16* __restrict__ x, const float* __restrict__ bias,
                                                 const bf16* dy, bf16* dx, uint64_t rows, uint32_t cols) {
    const uint64_t n8 = rows * cols / 8;
    ColumnWalk col(8 * global_thread(), 8 * grid_threads(), cols);
    for (uint64_t i = global_thread(); i < n8; i += grid_threads(), col.next()) {
        float h[8], b[8], d[8];
        load_bf16<8>(x + 8 * i, h);
        load_bf16<8>(dy + 8 * i, d);
        if (bias) {
            load_f32<8>(bias + col.c, b);
#pragma unroll
            for (int k = 0; k < 8; k++) h[k] += b[k];
        }
#pragma unroll
        for (int k = 0; k < 8; k++) d[k] *= gelu_grad_f(h[k]);
        store_bf16<8>(dx + 8 * i, d);
    }
}
