// Launch checks: __launch_bounds__ (.maxntid) and dynamic shared memory limits.
extern "C" __global__ void __launch_bounds__(128) bounded_128(float* out) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

extern "C" __global__ void dyn_smem_user(float* out) {
    extern __shared__ float d[];
    const unsigned t = threadIdx.x;
    d[t] = static_cast<float>(t);
    __syncthreads();
    out[t] = d[t ^ 1];
}
