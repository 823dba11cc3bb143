// Input augmentation (src/ops/augment): a batch of uint8 RGB crops, each its own size, resized
// to S x S with the antialiased triangle filter, mirrored where asked and normalized, written as
// [B, 3, S, S] images or directly as the patch rows [B, (S/p)^2, 3*p*p]. Launcher:
// src/ops/augment/cuda.rs; CPU twin: src/ops/augment/cpu.rs (the filter: src/ops/augment/mod.rs).
//
// One thread per output pixel computes its three channels (blockIdx.x: the pixels, one pass;
// blockIdx.y: the images, a loop past 65535 of them). Threads take the pixels in the output's
// order (raster order for images, patch by patch for patch rows), so consecutive threads write
// consecutive values of each channel: a block of 256 writes one run of 256 per channel for
// images and for p = 16, runs of p*p for other patch sizes. Taps are computed on the fly from
// integers (below) rather than staged in shared memory: they cost a few instructions each, and
// the source bytes a warp reads are a few neighbouring rows of the crop, which the caches serve.
#include "common.cuh"

__device__ __forceinline__ void stf(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void stf(bf16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// a / b for a >= 0, in 32 bits when a fits (64-bit division is a long sequence on the GPU).
__device__ __forceinline__ uint64_t div_u64(uint64_t a, uint32_t b) {
    return a <= 0xffffffffull ? (uint64_t)((uint32_t)a / b) : a / b;
}

// The taps of output sample o along an axis of n source samples resized to S.
//
// The filter (src/ops/augment/mod.rs) puts o's centre at c = (o + 0.5) n / S with support
// s = max(n / S, 1), takes taps floor(c - s + 0.5) .. floor(c + s + 0.5) clipped to [0, n), and
// weighs tap i by max(0, 1 - |i + 0.5 - c| / s), normalized by the sum. Multiplied through by
// 2S all of it is integers: with D = 2 max(n, S) (= 2 S s) and k_i = (2i + 1) S - (2o + 1) n
// (= 2S (i + 0.5 - c)), the weight is max(0, D - |k_i|) / D, and the D cancels in the
// normalization. So the tap range is exact (the twin's f64 floor can differ only where the
// boundary tap weighs 0), and so are the weights in f32 while |k_i| stays below 2^24 (crops
// under 4M pixels a side), and so are the weighted sums of bytes while below 2^24; what rounds
// is the normalization (and larger sums). The launcher keeps S < 2^16, so (2o + 1) n < 2^49
// never overflows.
struct Taps {
    uint32_t lo;     // first source sample
    uint32_t count;  // taps lo .. lo + count - 1, all inside [0, n)
    float k0;        // k of the first tap; tap t's is k0 + t * step
    float step;      // 2S
    float d;         // D: tap t weighs max(0, d - |k0 + t step|)
    float sum;       // the sum of the weights (> 0: the tap holding c weighs at least D / 2)
};

__device__ __forceinline__ Taps axis_taps(uint32_t o, uint32_t n, uint32_t S) {
    const int64_t d = 2 * (int64_t)max(n, S), s2 = 2 * (int64_t)S;
    const int64_t c2 = (2 * (int64_t)o + 1) * n;  // 2S c
    // floor((c -+ s + 0.5)) = floor((c2 -+ D + S) / 2S), clipped to [0, n]. A negative numerator
    // floors below 0, which the clip makes 0.
    const int64_t a = c2 - d + S;
    uint64_t lo = a > 0 ? div_u64((uint64_t)a, (uint32_t)s2) : 0;
    uint64_t hi = div_u64((uint64_t)(c2 + d + S), (uint32_t)s2);
    hi = min(hi, (uint64_t)n);
    lo = min(lo, hi);  // never more taps than [lo, hi) inside the crop, whatever the numbers
    Taps t;
    t.lo = (uint32_t)lo;
    t.count = (uint32_t)(hi - lo);
    t.k0 = (float)((2 * (int64_t)lo + 1) * S - c2);
    t.step = (float)s2;
    t.d = (float)d;
    float sum = 0.f, k = t.k0;
    for (uint32_t i = 0; i < t.count; i++, k += t.step) sum += fmaxf(0.f, t.d - fabsf(k));
    t.sum = sum;
    return t;
}

// Whether crop c's bytes lie inside the pixel buffer (and it is a crop at all): in 64 bits
// without overflow, as width * height of two u32 fits but 3 * width * height may not.
__device__ __forceinline__ bool crop_ok(const Crop& c, uint64_t pixels_len) {
    return c.width > 0 && c.height > 0 && c.flip <= 1 && c.offset <= pixels_len &&
           (uint64_t)c.width * c.height <= (pixels_len - c.offset) / 3;
}

// AugmentParams: src/contract.rs. T: the output's storage; the math is fp32.
template <typename T>
__device__ __forceinline__ void augment_t(const AugmentParams& p) {
    T* __restrict__ out = static_cast<T*>(p.out);
    const uint32_t S = p.size, P = p.patch, ss = S * S;  // S < 2^16 (the launcher checks)
    // The launcher gives every pixel its thread: ceil(S^2 / blockDim.x) blocks along x.
    const uint32_t q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= ss) return;
    // Output pixel q in output order: (y, x), where its channel 0 goes within an image (at) and
    // how far apart the channels are (cstride); the places of AugmentShape::out_index.
    uint32_t y, x, cstride;
    uint64_t at;
    if (P == 0) {
        y = q / S;
        x = q % S;
        at = q;
        cstride = ss;
    } else {
        const uint32_t pp = P * P, row = q / pp, within = q % pp, grid = S / P;
        y = (row / grid) * P + within / P;
        x = (row % grid) * P + within % P;
        at = (uint64_t)row * 3 * pp + within;
        cstride = pp;
    }
    // The normalization's constants out of the parameter struct by constant indices (a run-time
    // index would copy the struct to the stack).
    const float scale[3] = {p.scale[0], p.scale[1], p.scale[2]};
    const float bias[3] = {p.bias[0], p.bias[1], p.bias[2]};
    for (uint32_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
        const Crop cr = p.crops[b];
        float v[3];
        // A crop outside the buffer (or empty, or flip > 1) is a bad table: NaN for the whole
        // image, so it shows in the loss, and no byte outside the buffer is read.
        if (crop_ok(cr, p.pixels_len)) {
            const uint8_t* __restrict__ px = p.pixels + cr.offset;
            const uint32_t w = cr.width;
            const Taps ty = axis_taps(y, cr.height, S);
            const Taps tx = axis_taps(cr.flip ? S - 1 - x : x, w, S);
            float acc[3] = {0.f, 0.f, 0.f};
            float ky = ty.k0;
            for (uint32_t j = 0; j < ty.count; j++, ky += ty.step) {
                const float wy = fmaxf(0.f, ty.d - fabsf(ky));
                const uint8_t* __restrict__ src = px + 3 * ((uint64_t)(ty.lo + j) * w + tx.lo);
                // The row filtered along x, then normalized: a uniform crop gives back its colour
                // exactly (integer sums below 2^24, one correctly rounded division).
                float r[3] = {0.f, 0.f, 0.f};
                float kx = tx.k0;
                for (uint32_t i = 0; i < tx.count; i++, kx += tx.step) {
                    const float wx = fmaxf(0.f, tx.d - fabsf(kx));
#pragma unroll
                    for (int c = 0; c < 3; c++) r[c] += wx * (float)src[3 * i + c];
                }
#pragma unroll
                for (int c = 0; c < 3; c++) acc[c] += wy * (r[c] / tx.sum);
            }
#pragma unroll
            for (int c = 0; c < 3; c++) v[c] = acc[c] / ty.sum;
        } else {
#pragma unroll
            for (int c = 0; c < 3; c++) v[c] = __int_as_float(0x7fc00000);  // NaN
        }
        // Unfused, as the twin's `v * scale + bias`: equal sums give equal bits.
        const uint64_t base = (uint64_t)b * 3 * ss + at;
#pragma unroll
        for (int c = 0; c < 3; c++)
            stf(out, base + (uint64_t)c * cstride, __fadd_rn(__fmul_rn(v[c], scale[c]), bias[c]));
    }
}

extern "C" __global__ void augment_f32(const AugmentParams p) { augment_t<float>(p); }
extern "C" __global__ void augment_bf16(const AugmentParams p) { augment_t<bf16>(p); }
