// AdamW (decoupled weight decay, PyTorch's formulation) over every trainable tensor in one
// launch (a multi-tensor apply): fp32 parameters, gradients and moments, tensor t at its own
// pointers, elements numbered consecutively over the tensors (start[t] .. start[t+1]).
//   p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
//   p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 - b_i^t (host computes).
// `guard` (may be null): the update is skipped, nothing written, unless guard[0] is finite. The
// training step passes its loss, still on the device, so a non-finite loss leaves the weights
// and moments as they were without the host waiting for the loss before the update.
#include "common.cuh"

// AdamWParams (the tensors' pointers and the coefficients) and ADAMW_MAX_TENSORS: src/contract.rs.

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

extern "C" __global__ void adamw_multi_f32(const AdamWParams ts) {
    if (ts.guard != nullptr && !isfinite(ts.guard[0])) return;
    // The table in shared memory: indexing the parameter struct with a run-time tensor index
    // would copy it to the stack (local memory).
    __shared__ float* sp[ADAMW_MAX_TENSORS];
    __shared__ const float* sg[ADAMW_MAX_TENSORS];
    __shared__ float* sm[ADAMW_MAX_TENSORS];
    __shared__ float* sv[ADAMW_MAX_TENSORS];
    __shared__ uint64_t ss[ADAMW_MAX_TENSORS + 1];
#pragma unroll
    for (int t = 0; t < ADAMW_MAX_TENSORS; t++) {
        if (threadIdx.x == 0) {
            sp[t] = ts.p[t];
            sg[t] = ts.g[t];
            sm[t] = ts.m[t];
            sv[t] = ts.v[t];
            ss[t] = ts.start[t];
        }
    }
    if (threadIdx.x == 0) ss[ADAMW_MAX_TENSORS] = ts.start[ADAMW_MAX_TENSORS];
    __syncthreads();
    const AdamW a{ts.decay, ts.step_size, ts.inv_sqrt_bc2, ts.beta1, ts.beta2, ts.eps, ts.one_minus_beta1, ts.one_minus_beta2};
    const uint64_t total = ss[ts.count];
    uint32_t t = 0;  // this thread's tensor; its indices only grow, so the cursor only advances
    for (uint64_t i = global_thread(); i < total; i += grid_threads()) {
        while (i >= ss[t + 1]) t++;
        const uint64_t j = i - ss[t];
        float pi = sp[t][j], mi = sm[t][j], vi = sv[t][j];
        a.update(pi, sg[t][j], mi, vi);
        sp[t][j] = pi;
        sm[t][j] = mi;
        sv[t][j] = vi;
    }
}
