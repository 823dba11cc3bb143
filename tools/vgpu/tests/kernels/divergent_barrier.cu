// synccheck: a barrier only threads 0..15 of the block reach (launch with 64 threads).
extern "C" __global__ void divergent_barrier(float* out) {
    const unsigned t = threadIdx.x;
    if (t < 16) __syncthreads();
    out[t] = static_cast<float>(t);
}
