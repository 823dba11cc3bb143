// racecheck: thread t writes s[t], then reads s[(t + 32) % 64] (written by a thread of the
// other warp) with no __syncthreads() in between. Launch with 64 threads.
extern "C" __global__ void race_missing_sync(const float* __restrict__ in, float* __restrict__ out) {
    __shared__ float s[64];
    const unsigned t = threadIdx.x;
    s[t] = in[t];
    // BUG: __syncthreads() missing here.
    out[t] = s[(t + 32) & 63];
}
