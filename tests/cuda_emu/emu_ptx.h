// CPU emulation of the PTX instructions the tensor-core kernels (attention.cu, moe_mma.cu) issue
// through inline asm (cp.async, ldmatrix, mma.sync m16n8k16 bf16, ex2.approx) and of dynamic
// shared memory, for the emulator of cuda_bf16.h. kernels/ptx.cuh includes this file instead of
// its asm wrappers when MLVPT_CPU_EMULATION is defined. The warp-collective instructions follow the PTX ISA's fragment
// layouts ("Matrix Fragments for mma.m16n8k16", "ldmatrix"): every lane publishes its operands
// in a per-warp exchange area, the warp meets at a barrier, each lane computes what the
// hardware would hand it, and the warp meets again before the area is reused. So a wrong
// fragment index in the kernel gives a wrong result here, as on a GPU.
#pragma once
#include "cuda_bf16.h"
#include <cfloat>
#include <cstdio>
#include <cstdlib>

// Shared-memory "addresses" are host pointers here (the kernel only passes them through).
inline uintptr_t smem_u32(const void* p) { return (uintptr_t)p; }

// ldmatrix row addresses and cp.async's 16-byte copies must be 16-byte aligned on the GPU (a
// misaligned one is an error there): the emulator stops with a message instead of going on.
inline void emu_check_align16(const char* what, uintptr_t addr) {
    if (addr % 16 != 0) {
        fprintf(stderr, "%s: address %#lx is not 16-byte aligned\n", what, (unsigned long)addr);
        abort();
    }
}

// cp.async is synchronous here; commit and wait have nothing to order.
inline void cp_async16(uintptr_t dst, const void* src, bool valid) {
    emu_check_align16("cp.async (shared)", dst);
    emu_check_align16("cp.async (global)", (uintptr_t)src);
    if (valid) memcpy((void*)dst, src, 16);
    else memset((void*)dst, 0, 16);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

struct EmuWarpExchange {
    uintptr_t addr[32];
    uint32_t a[32][4];
    uint32_t b[32][2];
};
inline EmuWarpExchange emu_xchg[32];

inline uint16_t emu_ld16(uintptr_t p) { uint16_t v; memcpy(&v, (const void*)p, 2); return v; }
inline uint32_t emu_ld32(uintptr_t p) { uint32_t v; memcpy(&v, (const void*)p, 4); return v; }

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the 8 row addresses of matrix
// i; register i of lane (g, t) = (lane >> 2, lane & 3) receives row g, elements 2t and 2t+1.
// With .trans it receives elements g of rows 2t and 2t+1.
inline void emu_ldmatrix_x4(uint32_t (&r)[4], uintptr_t addr, bool trans) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    emu_check_align16("ldmatrix", addr);
    EmuWarpExchange& x = emu_xchg[emu_warp];
    x.addr[lane] = addr;
    emu_warp_bar->arrive_and_wait();
    for (int i = 0; i < 4; i++) {
        if (!trans) {
            r[i] = emu_ld32(x.addr[8 * i + g] + 4 * t);
        } else {
            const uint32_t lo = emu_ld16(x.addr[8 * i + 2 * t] + 2 * g);
            const uint32_t hi = emu_ld16(x.addr[8 * i + 2 * t + 1] + 2 * g);
            r[i] = lo | (hi << 16);
        }
    }
    emu_warp_bar->arrive_and_wait();
}
inline void ldsm_x4(uint32_t (&r)[4], uintptr_t addr) { emu_ldmatrix_x4(r, addr, false); }
inline void ldsm_x4_t(uint32_t (&r)[4], uintptr_t addr) { emu_ldmatrix_x4(r, addr, true); }

inline float emu_bf16_half(uint32_t reg, int hi) {
    __nv_bfloat16 h{(uint16_t)(hi ? reg >> 16 : reg & 0xffff)};
    return __bfloat162float(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += a b. Fragments (g, t as above):
//   a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// The products of bf16 values are exact in double; the sum is rounded once to f32 (the
// hardware's internal accumulation order and rounding are not modelled).
inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    EmuWarpExchange& x = emu_xchg[emu_warp];
    for (int i = 0; i < 4; i++) x.a[lane][i] = a[i];
    x.b[lane][0] = b0;
    x.b[lane][1] = b1;
    emu_warp_bar->arrive_and_wait();
    auto A = [&](int row, int k) {  // A[row][k]
        const int src = (row % 8) * 4 + (k % 8) / 2;
        const int reg = (row < 8 ? 0 : 1) + (k < 8 ? 0 : 2);
        return (double)emu_bf16_half(x.a[src][reg], k & 1);
    };
    auto B = [&](int k, int col) {  // B[k][col]
        const int src = col * 4 + (k % 8) / 2;
        return (double)emu_bf16_half(x.b[src][k < 8 ? 0 : 1], k & 1);
    };
    float d[4];
    for (int e = 0; e < 4; e++) {
        const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
        double s = c[e];
        for (int k = 0; k < 16; k++) s += A(row, k) * B(k, col);
        d[e] = (float)s;
    }
    emu_warp_bar->arrive_and_wait();
    for (int e = 0; e < 4; e++) c[e] = d[e];
}

// ex2.approx.ftz.f32: 2^x with subnormal results flushed to zero.
inline float exp2_approx(float x) {
    const float y = exp2f(x);
    return y < FLT_MIN ? 0.0f : y;
}

inline int block_y_again() { return (int)blockIdx.y; }

// Dynamic shared memory: the emulator's poisoned area (cuda_bf16.h).
inline unsigned char* dyn_smem() { return emu_dynamic_smem(); }
