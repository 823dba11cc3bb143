// A 2-stage cp.async pipeline (one warp, 16 bytes per lane per tile of 128 floats). Each tile
// is copied to shared memory by cp.async, then every lane writes out its neighbour's chunk:
// out[t*128 + 4*lane + e] = in[t*128 + 4*((lane + 1) % 32) + e].
// pipe_wait is correct; pipe_nowait never waits for its copies (no cp.async.wait_group), so
// it reads shared memory before the data lands.

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <bool WAIT>
__device__ __forceinline__ void pipe(const float* __restrict__ in, float* __restrict__ out, int tiles) {
    __shared__ __align__(16) float buf[2][128];
    const int lane = threadIdx.x;
    cp_async16(&buf[0][lane * 4], in + lane * 4);
    cp_async_commit();
    for (int t = 0; t < tiles; ++t) {
        if (t + 1 < tiles) cp_async16(&buf[(t + 1) & 1][lane * 4], in + (t + 1) * 128 + lane * 4);
        cp_async_commit();
        if (WAIT) asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        __syncthreads();
        const float4 v = *reinterpret_cast<const float4*>(&buf[t & 1][((lane + 1) & 31) * 4]);
        *reinterpret_cast<float4*>(out + t * 128 + lane * 4) = v;
        __syncthreads();
    }
}

extern "C" __global__ void pipe_wait(const float* __restrict__ in, float* __restrict__ out, int tiles) {
    pipe<true>(in, out, tiles);
}

extern "C" __global__ void pipe_nowait(const float* __restrict__ in, float* __restrict__ out, int tiles) {
    pipe<false>(in, out, tiles);
}
