// memcheck on shared memory.
// static_smem_overrun: a 64-float array indexed by threadIdx.x, launched with 65 threads.
extern "C" __global__ void static_smem_overrun(float* out) {
    __shared__ float s[64];
    const unsigned t = threadIdx.x;
    s[t] = static_cast<float>(t);
    __syncthreads();
    out[t] = s[(t + 1) & 63];
}

// dynamic_smem_overrun: indexes extern shared memory by threadIdx.x, launched with fewer
// bytes of dynamic shared memory than 4 * blockDim.x.
extern "C" __global__ void dynamic_smem_overrun(float* out) {
    extern __shared__ float d[];
    const unsigned t = threadIdx.x;
    d[t] = static_cast<float>(t);
    __syncthreads();
    out[t] = d[blockDim.x - 1 - t];
}
