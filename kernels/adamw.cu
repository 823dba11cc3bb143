// AdamW (decoupled weight decay, PyTorch's formulation) over one flat fp32 buffer holding every
// trainable tensor:
//   p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
//   p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 - b_i^t (host computes).
// Grid-stride; `_v4` moves four elements per step (16-byte aligned buffers, scalar tail).
#include "common.cuh"

struct AdamW {
    float decay;         // 1 - lr * wd
    float step_size;     // lr / bc1
    float inv_sqrt_bc2;  // 1 / sqrt(bc2)
    float beta1, beta2, eps;
    // 1 - beta from the host in f64: in f32, 1 - 0.999f is 1.3e-5 off (0.999 is not exact).
    float one_minus_beta1, one_minus_beta2;

    __device__ __forceinline__ void update(float& p, float g, float& m, float& v) const {
        m = fmaf(beta1, m, one_minus_beta1 * g);
        v = fmaf(beta2, v, one_minus_beta2 * g * g);
        const float denom = sqrtf(v) * inv_sqrt_bc2 + eps;
        p = p * decay - step_size * (m / denom);
    }
};

extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v, uint64_t n,
                                     float decay, float step_size, float inv_sqrt_bc2, float beta1,
                                     float beta2, float eps) {
    const AdamW a{decay, step_size, inv_sqrt_bc2, beta1, beta2, eps};
    for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
        float pi = p[i], mi = m[i], vi = v[i];
        a.update(pi, g[i], mi, vi);
        p[i] = pi; m[i] = mi; v[i] = vi;
    }
}

extern "C" __global__ void adamw_f32_v4(float* __restrict__ p, const float* __restrict__ g,
                                        float* __restrict__ m, float* __restrict__ v, uint64_t n,
                                        float decay, float step_size, float inv_sqrt_bc2,
                                        float beta1, float beta2, float eps,
                                     float one_minus_beta1, float one_minus_beta2) {
    const AdamW a{decay, step_size, inv_sqrt_bc2, beta1, beta2, eps, one_minus_beta1, one_minus_beta2};
    const uint64_t n4 = n / 4;
    for (uint64_t i = global_thread(); i < n4; i += grid_threads()) {
        float4 P = reinterpret_cast<float4*>(p)[i];
        float4 G = reinterpret_cast<const float4*>(g)[i];
        float4 M = reinterpret_cast<float4*>(m)[i];
        float4 V = reinterpret_cast<float4*>(v)[i];
        a.update(P.x, G.x, M.x, V.x);
        a.update(P.y, G.y, M.y, V.y);
        a.update(P.z, G.z, M.z, V.z);
        a.update(P.w, G.w, M.w, V.w);
        reinterpret_cast<float4*>(p)[i] = P;
        reinterpret_cast<float4*>(m)[i] = M;
        reinterpret_cast<float4*>(v)[i] = V;
    }
    const uint64_t t = 4 * n4 + global_thread();
    if (t < n) {
        float pi = p[t], mi = m[t], vi = v[t];
        a.update(pi, g[t], mi, vi);
        p[t] = pi; m[t] = mi; v[t] = vi;
    }
}
