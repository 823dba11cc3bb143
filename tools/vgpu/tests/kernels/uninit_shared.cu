// initcheck: even threads write their slot, odd threads do not; after the barrier every
// thread reads its neighbour's slot, so the even threads read slots nobody wrote.
extern "C" __global__ void uninit_shared(float* out) {
    __shared__ float s[64];
    const unsigned t = threadIdx.x;
    if ((t & 1) == 0) s[t] = static_cast<float>(t);
    __syncthreads();
    out[t] = s[t ^ 1];
}
