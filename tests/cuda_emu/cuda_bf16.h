// A minimal CUDA environment for running kernels/*.cu on the CPU (tests/head_emulated.rs):
// every CUDA thread of a block is a std::thread, blocks run one after another, __syncthreads
// is a block barrier and a warp shuffle goes through a per-warp buffer between two warp
// barriers. It checks indexing, bounds and barrier/shuffle structure, not GPU timing or the
// memory model. Named cuda_bf16.h so that kernels/common.cuh includes it unchanged.
#pragma once
#include <cstdint>
#include <cmath>
using std::isfinite;
#include <cstring>
#include <atomic>
#include <barrier>
#include <algorithm>
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Kernels that use inline PTX (attention.cu) include tests/cuda_emu/emu_ptx.h instead.
#define MLVPT_CPU_EMULATION 1
// Blocks run one at a time, so a function-static array is the block's shared memory.
#define __shared__ static
struct U3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local U3 threadIdx, blockIdx;
inline U3 blockDim, gridDim;
inline thread_local int emu_warp;
inline thread_local std::barrier<>* emu_block_bar;
inline thread_local std::barrier<>* emu_warp_bar;
inline double emu_warp_buf[32][32];
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T> T __shfl_xor_sync(unsigned, T v, int o) {
    int lane = threadIdx.x & 31;
    emu_warp_buf[emu_warp][lane] = (double)v;
    emu_warp_bar->arrive_and_wait();
    T r = (T)emu_warp_buf[emu_warp][lane ^ o];
    emu_warp_bar->arrive_and_wait();
    return r;
}
inline float __expf(float x) { return expf(x); }
inline void __syncwarp() { emu_warp_bar->arrive_and_wait(); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
template <class T> T __ldcg(const T* p) { return *p; }
template <class A, class B> auto min(A a, B b) { return a < b ? a : b; }
// CUDA's alignment, so a vector access the kernel misaligns is undefined here too (and may
// fault in an aligned SSE move) rather than silently fine.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct __nv_bfloat16 { uint16_t bits; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.bits << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return {(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

#include <functional>
#include <thread>
#include <vector>
#include <memory>
// Dynamic shared memory (`extern __shared__`): one area for every launch (blocks run one at a
// time), as large as a Hopper block may take. emu_launch fills it with 0xff bytes (NaN as f32
// and as bf16) before each block, so a kernel that reads what it never wrote, or what an
// earlier block left, computes NaN.
constexpr size_t EMU_DYN_SMEM_BYTES = 232448;
inline unsigned char* emu_dynamic_smem() {
    alignas(16) static unsigned char s[EMU_DYN_SMEM_BYTES];
    return s;
}
inline void emu_poison_dynamic_smem() { memset(emu_dynamic_smem(), 0xff, EMU_DYN_SMEM_BYTES); }
// Runs `kernel` (a closure calling the kernel function) on a grid of blocks of `threads`. The
// threads are made once per launch and walk the blocks in order; each block has its own
// barriers (a thread that returns early drops out of its block's barriers), and a launch-wide
// barrier keeps blocks one at a time.
inline void emu_launch(U3 grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    const unsigned nblocks = grid.x * grid.y * grid.z, nwarps = threads / 32;
    std::vector<std::unique_ptr<std::barrier<>>> block_bars, warp_bars;
    for (unsigned i = 0; i < nblocks; i++) {
        block_bars.emplace_back(new std::barrier<>(threads));
        for (unsigned w = 0; w < nwarps; w++) warp_bars.emplace_back(new std::barrier<>(32));
    }
    emu_poison_dynamic_smem();
    auto poison = []() noexcept { emu_poison_dynamic_smem(); };
    std::barrier<decltype(poison)> next_block(threads, poison);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; t++)
        ts.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            emu_warp = t / 32;
            for (unsigned i = 0; i < nblocks; i++) {
                blockIdx = {i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y)};
                emu_block_bar = block_bars[i].get();
                emu_warp_bar = warp_bars[i * nwarps + t / 32].get();
                kernel();
                emu_warp_bar->arrive_and_drop();
                emu_block_bar->arrive_and_drop();
                next_block.arrive_and_wait();
            }
        });
    for (auto& th : ts) th.join();
}
