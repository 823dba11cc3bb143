// Runs the fused attention kernels of kernels/attention.cu (their extern "C" entry points, with
// the grids the launcher uses) under the CPU emulator (cuda_bf16.h, emu_ptx.h) on random bf16
// inputs, every output and the scratch poisoned with NaN first, and dumps inputs and outputs
// as little-endian f32 for tests/attention_emulated.rs, which compares them with the CPU
// reference (src/ops/attention/cpu.rs).
//   attention_driver DIR SEED CASE...   CASE = tag:dh:B:h:N:ps:pe:qs:nq:fwd_variant:bwd_variant
// (variant v = the v-th tile shape of that head dim in ATTN_FWD_CONFIGS / ATTN_BWD_CONFIGS).
// Also writes DIR/tiles: every compiled forward (name, head dim, query rows per block, dynamic
// shared memory) and backward (name, head dim, keys per block, query rows per step, shared
// memory) as the kernel source computes them, and the head dims; the test checks the
// launcher's figures (FWD_TILES, BWD_TILES) against them.
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

using FwdFn = void (*)(const bf16*, bf16*, float*, int, int, int, int, int, int, float);
using PreFn = void (*)(const bf16*, const bf16*, float*, float*, int, int, int);
using BwdFn = void (*)(const bf16*, const bf16*, const float*, const float*, float*, bf16*, int, int, int, int, int,
                       int, float);
// Every compiled tile shape, in the kernel source's order (the first per head dim is the default).
struct FwdCfg { int dh, mt; bool pipe; const char* name; FwdFn fn; unsigned rows; size_t smem; };
using DqFn = void (*)(const bf16*, const bf16*, const float*, const float*, bf16*, int, int, int, int, int, int, float);
struct BwdCfg { int dh, bq, kw; bool split; const char* name; BwdFn fn; size_t smem; };
struct DqCfg { int dh, mt; const char* name; DqFn fn; unsigned rows; size_t smem; };
#define FWD_CFG(DH, MT, PIPE, MINB, NAME) {DH, MT, PIPE, #NAME, NAME, 16u * MT * attn::WARPS, attn::fwd_smem(DH, MT, PIPE)},
#define BWD_CFG(DH, BQ, KW, SPLIT, NAME) {DH, BQ, KW, SPLIT, #NAME, NAME, attn::bwd_smem(DH, BQ, KW, SPLIT)},
#define DQ_CFG(DH, MT, NAME) {DH, MT, #NAME, NAME, 16u * MT * attn::WARPS, attn::bwd_dq_smem(DH, MT)},
static const std::vector<FwdCfg> FWD = {ATTN_FWD_CONFIGS(FWD_CFG)};
static const std::vector<BwdCfg> BWD = {ATTN_BWD_CONFIGS(BWD_CFG)};
static const std::vector<DqCfg> DQ = {ATTN_BWD_DQ_CONFIGS(DQ_CFG)};

// The dQ pass of split backward `name` (`name`_dq).
static const DqCfg& dq_of(const char* name) {
    for (const DqCfg& c : DQ)
        if (std::string(c.name) == std::string(name) + "_dq") return c;
    fprintf(stderr, "no dQ pass for %s\n", name);
    exit(2);
}

static PreFn pre_of(int dh) {
    switch (dh) {
#define PRE_CASE(DH) \
    case DH: return attn_bwd_pre_d##DH;
        ATTN_HEAD_DIMS(PRE_CASE)
        default: fprintf(stderr, "no kernels for head dim %d\n", dh); exit(2);
    }
}

// The `variant`-th configuration of head dim `dh` in `list`.
template <class C>
static const C& config(const std::vector<C>& list, int dh, int variant) {
    int seen = 0;
    for (const C& c : list)
        if (c.dh == dh && seen++ == variant) return c;
    fprintf(stderr, "no variant %d at head dim %d\n", variant, dh);
    exit(2);
}

static void run(const std::string& spec) {
    char tag[64];
    int dh, B, H, N, ps, pe, qs, nq, fv, bv;
    if (sscanf(spec.c_str(), "%63[^:]:%d:%d:%d:%d:%d:%d:%d:%d:%d:%d", tag, &dh, &B, &H, &N, &ps, &pe, &qs, &nq, &fv,
               &bv) != 11) {
        fprintf(stderr, "bad case %s\n", spec.c_str());
        exit(2);
    }
    const FwdCfg& f = config(FWD, dh, fv);
    const BwdCfg& bw = config(BWD, dh, bv);
    const PreFn pre = pre_of(dh);
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
        emu_launch({cdiv(nq, f.rows), bh, 1}, attn::THREADS,
                   [&] { f.fn(qkv.data(), out.data(), lse.data(), N, H, ps, pe, qs, nq, scale); });
    emu_launch({3, 1, 1}, 128, [&] { pre(out.data(), dout.data(), dvec, bw.split ? nullptr : dq_acc, B, nq, H); });
    emu_launch({cdiv(N, 16 * bw.kw), bh, 1}, 32 * bw.kw, [&] {
        bw.fn(qkv.data(), dout.data(), lse.data(), dvec, dq_acc, dqkv.data(), N, H, ps, pe, qs, nq, scale);
    });
    if (bw.split) {
        const DqCfg& dq = dq_of(bw.name);
        if (nq > 0)
            emu_launch({cdiv(nq, dq.rows), bh, 1}, attn::THREADS, [&] {
                dq.fn(qkv.data(), dout.data(), lse.data(), dvec, dqkv.data(), N, H, ps, pe, qs, nq, scale);
            });
    } else {
        emu_launch({3, 1, 1}, 128,
                   [&] { attn_bwd_dq_convert(dq_acc, dqkv.data(), (uint64_t)B * N, N, qs, nq, D, scale); });
    }
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
    for (const FwdCfg& c : FWD) fprintf(f, "fwd %s %d %u %zu\n", c.name, c.dh, c.rows, c.smem);
    for (const BwdCfg& c : BWD) fprintf(f, "bwd %s %d %d %d %zu\n", c.name, c.dh, 16 * c.kw, c.bq, c.smem);
    for (const DqCfg& c : DQ) fprintf(f, "dq %s %d %u %zu\n", c.name, c.dh, c.rows, c.smem);
#define HEAD_DIM_LINE(DH) fprintf(f, "dh %d\n", DH);
    ATTN_HEAD_DIMS(HEAD_DIM_LINE)
    fclose(f);
    for (int i = 3; i < argc; i++) run(argv[i]);
    printf("ok %s\n", dir.c_str());
}
