// C (m x n, f32, row-major, ldc = n) = A (m x k, bf16, row-major, lda) * B (k x n, bf16,
// row-major, ldb), with lda and ldb multiples of 8 (16-byte rows for cp.async) but m, n, k
// arbitrary. Block tile 32x16, k step 16, two warps (warp w computes rows 16w..16w+15 as two
// m16n8k16 mma's). Tiles are double-buffered in shared memory by 16-byte cp.async with
// commit_group / wait_group 1; chunks past k or n are zero-filled by cp.async's src-size, rows
// past m or k have src-size 0. A fragments: ldmatrix.x4; B fragments: ldmatrix.x4.trans (B is
// k-major in shared memory, the mma wants it n-major).

#define BM 32
#define BN 16
#define BK 16

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}

extern "C" __global__ void __launch_bounds__(64)
    gemm_bf16(const unsigned short* __restrict__ a, const unsigned short* __restrict__ b, float* __restrict__ c,
              int m, int n, int k, int lda, int ldb) {
    __shared__ __align__(16) unsigned short sa[2][BM][BK];
    __shared__ __align__(16) unsigned short sb[2][BK][BN];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int ktiles = (k + BK - 1) / BK;

    // One 16-byte chunk of A per thread (32 rows x 2 chunks), one of B per thread < 32.
    auto load = [&](int kt, int buf) {
        const int k0 = kt * BK;
        const int ar = tid >> 1, ac = (tid & 1) * 8;
        const int gm = m0 + ar, gk = k0 + ac;
        const int abytes = (gm < m && gk < k) ? min(k - gk, 8) * 2 : 0;
        cp_async16(&sa[buf][ar][ac], abytes ? a + (size_t)gm * lda + gk : a, abytes);
        if (tid < 32) {
            const int br = tid >> 1, bc = (tid & 1) * 8;
            const int gkb = k0 + br, gn = n0 + bc;
            const int bbytes = (gkb < k && gn < n) ? min(n - gn, 8) * 2 : 0;
            cp_async16(&sb[buf][br][bc], bbytes ? b + (size_t)gkb * ldb + gn : b, bbytes);
        }
    };

    float acc[2][4] = {};
    load(0, 0);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    for (int kt = 0; kt < ktiles; ++kt) {
        if (kt + 1 < ktiles) load(kt + 1, (kt + 1) & 1);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        __syncthreads();
        const int buf = kt & 1;
        // Lane 8i+r gives row r of matrix i; A's matrices: (rows 0-7, k 0-7), (rows 8-15,
        // k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) of this warp's 16 rows. B's (with
        // .trans): (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), i.e.
        // b0, b1 of the first n8 tile then of the second.
        const int mi = lane >> 3, r = lane & 7;
        const int row = (mi & 1) * 8 + r, col = (mi >> 1) * 8;
        unsigned af[4], bf[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(af[0]), "=r"(af[1]), "=r"(af[2]), "=r"(af[3])
                     : "r"(smem_addr(&sa[buf][warp * 16 + row][col]))
                     : "memory");
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(bf[0]), "=r"(bf[1]), "=r"(bf[2]), "=r"(bf[3])
                     : "r"(smem_addr(&sb[buf][row][col]))
                     : "memory");
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                "{%8, %9}, {%0, %1, %2, %3};\n"
                : "+f"(acc[j][0]), "+f"(acc[j][1]), "+f"(acc[j][2]), "+f"(acc[j][3])
                : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "r"(bf[2 * j]), "r"(bf[2 * j + 1]));
        }
        // The next iteration's copies overwrite the buffer just read.
        __syncthreads();
    }

    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int gm = m0 + warp * 16 + g + 8 * h;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int gn = n0 + j * 8 + 2 * t + e;
                if (gm < m && gn < n) c[(size_t)gm * n + gn] = acc[j][2 * h + e];
            }
        }
    }
}
