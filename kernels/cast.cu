// f32 <-> bf16 conversions (round to nearest even), grid-stride. The `_v4` variants move four
// elements per step (16-byte f32 side, 8-byte bf16 side; the launcher checks alignment) and
// finish the n % 4 tail with scalar steps.
#include "common.cuh"

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, uint64_t n) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y, uint64_t n) {
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) y[i] = __bfloat162float(x[i]);
}

extern "C" __global__ void cast_f32_bf16_v4(const float* __restrict__ x, bf16* __restrict__ y, uint64_t n) {
    const uint64_t n4 = n / 4;
    for (uint64_t i = global_thread(); i < n4; i += grid_threads()) {
        float4 v = reinterpret_cast<const float4*>(x)[i];
        uint2 raw;
        bf162* h = reinterpret_cast<bf162*>(&raw);
        h[0] = __floats2bfloat162_rn(v.x, v.y);
        h[1] = __floats2bfloat162_rn(v.z, v.w);
        reinterpret_cast<uint2*>(y)[i] = raw;
    }
    const uint64_t t = 4 * n4 + global_thread();
    if (t < n) y[t] = __float2bfloat16_rn(x[t]);
}

extern "C" __global__ void cast_bf16_f32_v4(const bf16* __restrict__ x, float* __restrict__ y, uint64_t n) {
    const uint64_t n4 = n / 4;
    for (uint64_t i = global_thread(); i < n4; i += grid_threads()) {
        uint2 raw = reinterpret_cast<const uint2*>(x)[i];
        const bf162* h = reinterpret_cast<const bf162*>(&raw);
        float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
        reinterpret_cast<float4*>(y)[i] = make_float4(a.x, a.y, b.x, b.y);
    }
    const uint64_t t = 4 * n4 + global_thread();
    if (t < n) y[t] = __bfloat162float(x[t]);
}
