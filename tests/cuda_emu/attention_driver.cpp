// Runs the fused attention kernels of kernels/attention.cu (their extern "C" entry points, with
// the grids the launcher uses) under the CPU emulator (cuda_bf16.h, emu_ptx.h) on random bf16
// inputs, every output and the scratch poisoned with NaN first, and dumps inputs and outputs
// as little-endian f32 for tests/attention_emulated.rs, which compares them with the CPU
// reference (src/ops/attention/cpu.rs).
//   attention_driver DIR SEED CASE...   CASE = tag:dh:B:h:N:ps:pe:qs:nq
// Also writes DIR/tiles: per head dim, the forward's query rows per block, the backward's keys
// per block and query rows per step, and the dynamic shared memory of both, as the kernel
// source computes them (the test checks the launcher's figures, FusedTiles).
#include "cuda_bf16.h"
#include "attention.cu"
#include <cstdio>
#include <random>
#include <string>
#include <sys/stat.h>
static std::mt19937 rng;
static std::string dir;
static std::vector<bf16> uni_bf16(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<bf16> v(n);
    for (auto& x : v) x = __float2bfloat16_rn(d(rng));
    return v;
}
static void dump(const std::string& name, const std::vector<float>& v) {
    FILE* f = fopen((dir + "/" + name).c_str(), "wb");
    fwrite(v.data(), 4, v.size(), f);
    fclose(f);
}
static std::vector<float> wide(const std::vector<bf16>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); i++) o[i] = __bfloat162float(v[i]);
    return o;
}
static unsigned cdiv(unsigned a, unsigned b) { return (a + b - 1) / b; }

struct Kernels {
    void (*fwd)(const bf16*, bf16*, float*, int, int, int, int, int, int, float);
    void (*pre)(const bf16*, const bf16*, float*, float*, int, int, int);
    void (*bwd)(const bf16*, const bf16*, const float*, const float*, float*, bf16*, int, int, int, int, int, int, float);
    unsigned fwd_rows, bwd_keys;
    size_t fwd_smem, bwd_smem;
};

template <int DH>
static Kernels kernels_of();
#define KERNELS(DH)                                                                                              \
    template <>                                                                                                  \
    Kernels kernels_of<DH>() {                                                                                   \
        using T = attn::Tiles<DH>;                                                                               \
        return {attn_fwd_d##DH, attn_bwd_pre_d##DH, attn_bwd_d##DH, T::FWD_ROWS, T::BWD_KEYS, T::fwd_smem(),      \
                T::bwd_smem()};                                                                                  \
    }
ATTN_HEAD_DIMS(KERNELS)

static Kernels kernels(int dh) {
    switch (dh) {
#define CASE(DH) \
    case DH: return kernels_of<DH>();
        ATTN_HEAD_DIMS(CASE)
        default: fprintf(stderr, "no kernels for head dim %d\n", dh); exit(2);
    }
}

static void run(const std::string& spec) {
    char tag[64];
    int dh, B, H, N, ps, pe, qs, nq;
    if (sscanf(spec.c_str(), "%63[^:]:%d:%d:%d:%d:%d:%d:%d:%d", tag, &dh, &B, &H, &N, &ps, &pe, &qs, &nq) != 9) {
        fprintf(stderr, "bad case %s\n", spec.c_str());
        exit(2);
    }
    const Kernels k = kernels(dh);
    const int D = H * dh;
    const float scale = 1.0f / sqrtf((float)dh);
    auto qkv = uni_bf16((size_t)B * N * 3 * D, -2.0f, 2.0f);
    auto dout = uni_bf16((size_t)B * nq * D, -1.0f, 1.0f);
    const bf16 nan_b = __float2bfloat16_rn(NAN);
    std::vector<bf16> out((size_t)B * nq * D, nan_b), dqkv(qkv.size(), nan_b);
    std::vector<float> lse((size_t)B * H * nq, NAN);
    std::vector<float> scratch((size_t)B * nq * D + (size_t)B * H * nq, NAN);
    float* dq_acc = scratch.data();
    float* dvec = scratch.data() + (size_t)B * nq * D;
    const unsigned bh = B * H;
    if (nq > 0)
        emu_launch({cdiv(nq, k.fwd_rows), bh, 1}, attn::THREADS,
                   [&] { k.fwd(qkv.data(), out.data(), lse.data(), N, H, ps, pe, qs, nq, scale); });
    emu_launch({3, 1, 1}, 128, [&] { k.pre(out.data(), dout.data(), dvec, dq_acc, B, nq, H); });
    emu_launch({cdiv(N, k.bwd_keys), bh, 1}, attn::THREADS, [&] {
        k.bwd(qkv.data(), dout.data(), lse.data(), dvec, dq_acc, dqkv.data(), N, H, ps, pe, qs, nq, scale);
    });
    emu_launch({3, 1, 1}, 128,
               [&] { attn_bwd_dq_convert(dq_acc, dqkv.data(), (uint64_t)B * N, N, qs, nq, D, scale); });
    const std::string t = tag;
    dump(t + "_qkv", wide(qkv));
    dump(t + "_dout", wide(dout));
    dump(t + "_out", wide(out));
    dump(t + "_lse", lse);
    dump(t + "_dqkv", wide(dqkv));
}

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: attention_driver DIR SEED CASE...\n");
        return 2;
    }
    dir = argv[1];
    rng.seed(strtoul(argv[2], nullptr, 10));
    mkdir(dir.c_str(), 0755);
    FILE* f = fopen((dir + "/tiles").c_str(), "w");
#define TILES(DH)                                                                                          \
    fprintf(f, "%d %u %u %d %zu %zu\n", DH, attn::Tiles<DH>::FWD_ROWS, attn::Tiles<DH>::BWD_KEYS,          \
            attn::Tiles<DH>::BQ, attn::Tiles<DH>::fwd_smem(), attn::Tiles<DH>::bwd_smem());
    ATTN_HEAD_DIMS(TILES)
    fclose(f);
    for (int i = 3; i < argc; i++) run(argv[i]);
    printf("ok %s\n", dir.c_str());
}
