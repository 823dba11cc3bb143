// One warp computes one m16n8k16 tile, C (16x8, f32, row-major) = A (16x16) * B (16x8), with
// A given row-major (a[m*16 + k]) and B given column-major (b[n*16 + k]), both bf16 bits.
// The operands go through shared memory, ldmatrix and mma.sync. The variants break one step:
//   mma_tile_ok                  correct;
//   mma_tile_wrong_row           lane 9 gives row 10 of A instead of row 9 (to ldmatrix);
//   mma_tile_misaligned_ldmatrix lane 3's row address is 8 bytes past a 16-byte boundary;
//   mma_tile_trans_b             B is loaded with ldmatrix .trans (it is already k-contiguous);
//   mma_tile_half_warp_ldmatrix  only lanes 0..15 execute the A ldmatrix (.aligned).

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

template <int BUG>
__device__ __forceinline__ void mma_tile(const unsigned short* __restrict__ a,
                                         const unsigned short* __restrict__ b, float* __restrict__ c) {
    __shared__ __align__(16) unsigned short sa[16 * 16];
    __shared__ __align__(16) unsigned short sb[8 * 16];
    const int lane = threadIdx.x;
    for (int i = lane; i < 16 * 16; i += 32) sa[i] = a[i];
    for (int i = lane; i < 8 * 16; i += 32) sb[i] = b[i];
    __syncthreads();

    // ldmatrix .x4 for A: lane 8i+r gives row r of matrix i; matrices 0..3 are
    // (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    const int mi = lane >> 3, r = lane & 7;
    int row = (mi & 1) * 8 + r;
    if (BUG == 1 && lane == 9) row += 1;
    unsigned addr_a = smem_addr(&sa[row * 16 + (mi >> 1) * 8]);
    if (BUG == 2 && lane == 3) addr_a += 8;
    unsigned a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    if (BUG != 4 || lane < 16) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3)
                     : "r"(addr_a)
                     : "memory");
    }
    // ldmatrix .x2 for B (rows n 0-7, k 0-7 then k 8-15): lanes 0..15 give the addresses;
    // the others give valid ones too.
    const unsigned addr_b = smem_addr(&sb[r * 16 + (mi & 1) * 8]);
    unsigned b0, b1;
    if (BUG == 3) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                     : "=r"(b0), "=r"(b1)
                     : "r"(addr_b)
                     : "memory");
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                     : "=r"(b0), "=r"(b1)
                     : "r"(addr_b)
                     : "memory");
    }
    float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    const int g = lane >> 2, t = lane & 3;
    c[g * 8 + 2 * t] = d0;
    c[g * 8 + 2 * t + 1] = d1;
    c[(g + 8) * 8 + 2 * t] = d2;
    c[(g + 8) * 8 + 2 * t + 1] = d3;
}

#define MMA_TILE_KERNEL(NAME, BUG)                                                                  \
    extern "C" __global__ void NAME(const unsigned short* __restrict__ a,                           \
                                    const unsigned short* __restrict__ b, float* __restrict__ c) { \
        mma_tile<BUG>(a, b, c);                                                                     \
    }

MMA_TILE_KERNEL(mma_tile_ok, 0)
MMA_TILE_KERNEL(mma_tile_wrong_row, 1)
MMA_TILE_KERNEL(mma_tile_misaligned_ldmatrix, 2)
MMA_TILE_KERNEL(mma_tile_trans_b, 3)
MMA_TILE_KERNEL(mma_tile_half_warp_ldmatrix, 4)
