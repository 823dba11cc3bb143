// Asymmetric loss (docs/MODEL.md#the-asymmetric-loss) fused with the sigmoid, from fp32 logits
// and targets, mirroring src/ops/asl/cpu.rs term by term (log-sigmoid logs, eps clamp with zero
// slope, clip floor, constant or exact focusing weights). Writes grad[i] = scale * dl/dx_i (grad
// may be null) and loss_out[0] = scale * sum_i l_i. One kernel serves one term and the training
// loss's four (the single-term launcher passes nterms = 1).
// One launch gives one loss value deterministically: each block sums its grid-stride share in
// double in a fixed tree and writes partials[block]; the last block to finish (ticket from
// `counter`) adds the partials in index order and resets the counter for the next launch.
#include "common.cuh"

// log_sigmoid, sigmoid_f: common.cuh (the head's prediction uses sigmoid_f too).

struct Asl {
    float gp, gn, clip, log_eps;
    int exact;

    // Loss of one element; writes d loss / dx to *d.
    __device__ __forceinline__ float eval(float x, float y, float* d) const {
        const float p = sigmoid_f(x);
        const float q = sigmoid_f(-x);
        const float lp_raw = log_sigmoid(x);
        const bool lp_clamped = lp_raw < log_eps;
        const float lp = lp_clamped ? log_eps : lp_raw;
        const float wp = powf(q, gp);
        float pm, ln_raw;
        if (clip > 0.0f) {
            pm = fmaxf(p - clip, 0.0f);
            ln_raw = pm > 0.0f ? logf(q + clip) : 0.0f;
        } else {
            pm = p;
            ln_raw = log_sigmoid(-x);
        }
        const bool ln_clamped = ln_raw < log_eps;
        const float ln = ln_clamped ? log_eps : ln_raw;
        const float wn = powf(pm, gn);
        const float yn = 1.0f - y;
        const float loss = -(y * wp * lp) - yn * wn * ln;

        const float dlp = lp_clamped ? 0.0f : q;
        const float dln = (ln_clamped || pm <= 0.0f) ? 0.0f : (clip > 0.0f ? -(p * q) / (q + clip) : -p);
        float g = -(y * wp * dlp) - yn * wn * dln;
        if (exact) {
            const float dwp = -(gp * p * wp);
            const float dwn = (pm <= 0.0f || gn == 0.0f)
                                  ? 0.0f
                                  : (clip > 0.0f ? gn * powf(pm, gn - 1.0f) * p * q : gn * wn * q);
            g = g - y * dwp * lp - yn * dwn * ln;
        }
        *d = g;
        return loss;
    }
};

// The training loss's terms in one launch (ASL(y+) + ASL(y-) + ASL(m+) + ASL(m-),
// docs/MODEL.md#the-training-loss):
// up to four logit buffers of n elements against the same targets, each with its own gradient
// buffer (null: none), one loss = scale * sum over terms and elements, in a fixed order (each
// thread's grid-stride share of term 0, then term 1, ...; block partials added in block order
// by the last block). AslParams: src/contract.rs.
extern "C" __global__ void asl_terms_fwd_bwd_f32(const AslParams p) {
    __shared__ double scratch[32];
    __shared__ bool last;
    const Asl asl{p.gamma_pos, p.gamma_neg, p.clip, p.log_eps, p.exact_grad};
    const float* __restrict__ targets = p.targets;
    const uint64_t n = p.n;
    const float scale = p.scale;
    double acc = 0.0;
    // Terms unrolled so the pointer arrays are indexed by constants (a run-time index would
    // copy the parameter struct to the stack).
#pragma unroll
    for (int s = 0; s < ASL_MAX_TERMS; s++) {
        if (s >= (int)p.nterms) break;
        const float* __restrict__ lp = p.logits[s];
        float* __restrict__ gp = p.grad[s];
        for (uint64_t i = global_thread(); i < n; i += grid_threads()) {
            float d;
            acc += (double)asl.eval(lp[i], targets[i], &d);
            if (gp) gp[i] = scale * d;
        }
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        p.partials[blockIdx.x] = acc;
        __threadfence();
        last = atomicAdd(p.counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    double total = 0.0;
    for (uint32_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) total += __ldcg(p.partials + b);
    total = block_sum(total, scratch);
    if (threadIdx.x == 0) {
        p.loss_out[0] = (float)(total * (double)scale);
        *p.counter = 0;
    }
}
