// Bias broadcast for the cuBLAS linear layer (src/gpu/blas.rs): y[r, c] = bias[c] over a
// row-major [rows, cols] matrix, after which the GEMM adds X W^T with beta = 1. Grid-stride.
#include "common.cuh"

extern "C" __global__ void bias_rows_bf16(const float* __restrict__ bias, bf16* __restrict__ y, uint64_t n,
                                          uint32_t cols) {
    ColumnWalk col(global_thread(), grid_threads(), cols);
    for (uint64_t i = global_thread(); i < n; i += grid_threads(), col.next()) y[i] = __float2bfloat16_rn(bias[col.c]);
}

extern "C" __global__ void bias_rows_f32(const float* __restrict__ bias, float* __restrict__ y, uint64_t n,
                                         uint32_t cols) {
    ColumnWalk col(global_thread(), grid_threads(), cols);
    for (uint64_t i = global_thread(); i < n; i += grid_threads(), col.next()) y[i] = bias[col.c];
}
