// memcheck: `<=` where `<` was meant; thread i == n stores one element past an n-element buffer.
extern "C" __global__ void oob_global_store(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 2.0f * static_cast<float>(i);
}
