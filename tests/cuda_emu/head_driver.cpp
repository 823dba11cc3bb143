// Runs kernels/head.cu under the CPU emulator (cuda_bf16.h) on random inputs and dumps inputs and
// outputs as raw little-endian f32/u32 files for tests/head_emulated.rs, which compares them
// with the CPU reference. The launch shapes mirror src/ops/head/cuda.rs. KERNELS picks the
// contraction kernels of the MoE ops and the adapters: fp32 (head.cu) or mma (moe_mma.cu and
// adapter_mma.cu, tensor cores).
//   head_driver DIR B T E K D r LABEL_GATING SEED KERNELS
#include "cuda_bf16.h"
#include "head.cu"
#include "moe_mma.cu"
#include "adapter_mma.cu"
#include <cstdio>
#include <random>
#include <string>
#include <sys/stat.h>
typedef __nv_bfloat16 bf;
static std::mt19937 rng;
std::vector<float> uni(size_t n, float lo, float hi) { std::uniform_real_distribution<float> d(lo, hi); std::vector<float> v(n); for (auto& x : v) x = d(rng); return v; }
std::vector<bf> tobf(const std::vector<float>& v) { std::vector<bf> o(v.size()); for (size_t i = 0; i < v.size(); i++) o[i] = __float2bfloat16_rn(v[i]); return o; }
std::string dir;
void dump(const char* name, const std::vector<float>& v) { FILE* f = fopen((dir + "/" + name).c_str(), "wb"); fwrite(v.data(), 4, v.size(), f); fclose(f); }
void dump(const char* name, const std::vector<bf>& v) { std::vector<float> o(v.size()); for (size_t i = 0; i < v.size(); i++) o[i] = __bfloat162float(v[i]); dump(name, o); }
void dumpu(const char* name, const std::vector<uint32_t>& v) { FILE* f = fopen((dir + "/" + name).c_str(), "wb"); fwrite(v.data(), 4, v.size(), f); fclose(f); }
void inv(const std::vector<uint32_t>& t, size_t range, std::vector<uint32_t>& off, std::vector<uint32_t>& items) {
    off.assign(range + 1, 0); items.assign(t.size(), 0);
    for (auto v : t) off[v + 1]++;
    for (size_t v = 0; v < range; v++) off[v + 1] += off[v];
    auto fill = off;
    for (size_t i = 0; i < t.size(); i++) items[fill[t[i]]++] = i;
}
// Threads of a column-per-thread kernel: D/8 rounded up to a warp.
unsigned ru32(unsigned x) { return (x + 31) / 32 * 32; }
int main(int argc, char** argv) {
    if (argc != 11) { fprintf(stderr, "usage: head_driver DIR B T E K D r LABEL_GATING SEED fp32|mma\n"); return 2; }
    const bool mma = std::string(argv[10]) == "mma";
    dir = argv[1];
    unsigned B = atoi(argv[2]), T = atoi(argv[3]), E = atoi(argv[4]), K = atoi(argv[5]), D = atoi(argv[6]), R = atoi(argv[7]);
    bool label = atoi(argv[8]);
    rng.seed(strtoul(argv[9], nullptr, 10));
    mkdir(dir.c_str(), 0755);
    unsigned P = 2 * T * E, rows = label ? E * K : E * T;
    std::vector<uint32_t> group(K), tok(E * K), grow(E * K);
    for (unsigned k = 0; k < K; k++) group[k] = k < T ? k : rng() % T;
    for (unsigned e = 0; e < E; e++) for (unsigned k = 0; k < K; k++) { tok[e * K + k] = T * E + group[k] * E + e; grow[e * K + k] = label ? e * K + k : e * T + group[k]; }
    std::vector<uint32_t> toff, tit, goff, git; inv(tok, P, toff, tit); inv(grow, rows, goff, git);
    size_t maxc = 0;
    for (unsigned t = 0; t < P; t++) maxc = std::max<size_t>(maxc, toff[t + 1] - toff[t]);
    const unsigned mma_pair_tiles = std::max<size_t>(1, (maxc + 63) / 64), mma_col_tiles = (D + 63) / 64;
    float a = 3.0f / sqrtf(D);
    auto z = tobf(uni(B * P * D, -1, 1));
    auto w1 = uni(P * R * D, -2.0f / sqrtf(D), 2.0f / sqrtf(D)), b1 = uni(P * R, -0.5, 0.5), w2 = uni(P * D * R, -0.5, 0.5), b2 = uni(P * D, -0.1, 0.1);
    std::vector<float> u(B * P * R, NAN); std::vector<bf> ad(B * P * D, __float2bfloat16_rn(NAN));
    if (mma) emu_launch({P, (B + 15) / 16, 1}, 128, [&] { adapter_fwd_mma(z.data(), w1.data(), b1.data(), w2.data(), b2.data(), u.data(), ad.data(), B, P, D, R); });
    else emu_launch({P, (B + 15) / 16, 1}, ru32(D / 8), [&] { adapter_fwd(z.data(), w1.data(), b1.data(), w2.data(), b2.data(), u.data(), ad.data(), B, P, D, R); });
    auto gate = uni(rows * D, -a, a), w = uni(K * D, -a, a), c = uni(K, -0.5, 0.5);
    std::vector<float> y(B * K, NAN), m(B * K, NAN), q(B * E * K, NAN), r(B * E * K, NAN);
    if (mma) emu_launch({P, (B + 63) / 64, 2 * mma_pair_tiles}, 128, [&] { moe_fwd_scores_mma(z.data(), ad.data(), gate.data(), w.data(), grow.data(), toff.data(), tit.data(), q.data(), r.data(), B, P, D, K, E); });
    else emu_launch({P, (B + 31) / 32, 1}, 256, [&] { moe_fwd_scores(z.data(), ad.data(), gate.data(), w.data(), grow.data(), toff.data(), tit.data(), q.data(), r.data(), B, P, D, K, E); });
    emu_launch({2, 1, 1}, 256, [&] { moe_fwd_mix(q.data(), r.data(), c.data(), y.data(), m.data(), B, K, E); });
    auto dy = uni(B * K, -1, 1), dm = uni(B * K, -1, 1);
    auto dz0 = tobf(uni(B * P * D, -0.5, 0.5)), da0 = tobf(uni(B * P * D, -0.5, 0.5));
    auto dz = dz0, da = da0;
    std::vector<float> dq(B * E * K, NAN), dr(B * E * K, NAN), dgate(rows * D, NAN), dw(K * D, NAN), dc(K, NAN);
    emu_launch({2, 1, 1}, 256, [&] { moe_bwd_coef(dy.data(), dm.data(), q.data(), r.data(), dq.data(), dr.data(), B, K, E); });
    if (mma) emu_launch({P, (B + 63) / 64, 2 * mma_col_tiles}, 128, [&] { moe_bwd_tokens_mma(dq.data(), dr.data(), gate.data(), w.data(), grow.data(), toff.data(), tit.data(), dz.data(), da.data(), B, P, D, K, E); });
    else emu_launch({P, (B + 7) / 8, 1}, ru32(D / 8), [&] { moe_bwd_tokens(dq.data(), dr.data(), gate.data(), w.data(), grow.data(), toff.data(), tit.data(), dz.data(), da.data(), B, P, D, K, E); });
    {
        unsigned tiles_y = std::max<size_t>(1, (maxc + 7) / 8), tiles_z = (D + 255) / 256;
        std::vector<float> pr(E * K * D, NAN);
        auto pairs = [&](const float* coef, const bf* x) {
            if (mma) emu_launch({P, mma_pair_tiles, mma_col_tiles}, 128, [&] { moe_bwd_pairs_mma(coef, x, toff.data(), tit.data(), pr.data(), B, P, D, K, E); });
            else emu_launch({P, tiles_y, tiles_z}, 256, [&] { moe_bwd_pairs(coef, x, toff.data(), tit.data(), pr.data(), B, P, D, K, E); });
        };
        pairs(dr.data(), ad.data());
        emu_launch({2, 1, 1}, 256, [&] { moe_sum_pairs(pr.data(), nullptr, nullptr, dw.data(), K, D, K, E); });
        pr.assign(pr.size(), NAN);  // every pair row must be rewritten
        pairs(dq.data(), z.data());
        emu_launch({3, 1, 1}, 256, [&] { moe_sum_pairs(pr.data(), goff.data(), git.data(), dgate.data(), rows, D, K, E); });
        emu_launch({1, 1, 1}, 256, [&] { column_sums(dy.data(), dc.data(), B, K); });
    }
    auto dout = tobf(uni(B * P * D, -1, 1));
    auto dz2_0 = tobf(uni(B * P * D, -0.5, 0.5)); auto dz2 = dz2_0;
    std::vector<float> du(B * P * R, NAN), dw1(P * R * D, NAN), db1(P * R, NAN), dw2(P * D * R, NAN), db2(P * D, NAN);
    if (mma) emu_launch({P, (B + 15) / 16, 1}, 128, [&] { adapter_bwd_tokens_mma(dout.data(), u.data(), w1.data(), w2.data(), du.data(), dz2.data(), B, P, D, R); });
    else emu_launch({P, (B + 15) / 16, 1}, ru32(D / 8), [&] { adapter_bwd_tokens(dout.data(), u.data(), w1.data(), w2.data(), du.data(), dz2.data(), B, P, D, R); });
    if (mma) emu_launch({P, (D + 63) / 64, 1}, 128, [&] { adapter_bwd_params_mma(dout.data(), z.data(), u.data(), du.data(), dw1.data(), db1.data(), dw2.data(), db2.data(), B, P, D, R); });
    else emu_launch({P, (D + 255) / 256, 1}, 256, [&] { adapter_bwd_params(dout.data(), z.data(), u.data(), du.data(), dw1.data(), db1.data(), dw2.data(), db2.data(), B, P, D, R); });
    std::vector<float> zbar(B * D, NAN), csum(K, NAN), pred(B * K, NAN), prob(B * K, NAN);
    emu_launch({2, 1, 1}, 256, [&] { vpt_mean(z.data(), zbar.data(), B, P, D); });
    emu_launch({2, 1, 1}, 256, [&] { column_sums(dy.data(), csum.data(), B, K); });
    std::vector<bf> spread(B * P * D, __float2bfloat16_rn(NAN));
    emu_launch({2, 1, 1}, 256, [&] { vpt_spread(zbar.data(), spread.data(), B, P, D); });
    emu_launch({2, 1, 1}, 256, [&] { head_predict(y.data(), m.data(), pred.data(), prob.data(), (uint64_t)B * K); });
    FILE* f = fopen((dir + "/shape").c_str(), "w"); fprintf(f, "%u %u %u %u %u %u %u %u\n", B, T, E, K, D, R, label, rows); fclose(f);
    dumpu("tok", tok); dumpu("grow", grow); dumpu("tok_offsets", toff); dumpu("tok_items", tit);
    dump("z", z); dump("w1", w1); dump("b1", b1); dump("w2", w2); dump("b2", b2); dump("u", u); dump("adapted", ad);
    dump("gate", gate); dump("w", w); dump("c", c); dump("y", y); dump("m", m); dump("q", q); dump("r", r);
    dump("dy", dy); dump("dm", dm); dump("dz0", dz0); dump("da0", da0); dump("dz", dz); dump("da", da); dump("dgate", dgate); dump("dw", dw); dump("dc", dc);
    dump("dout", dout); dump("dz2_0", dz2_0); dump("dz2", dz2); dump("du", du); dump("dw1", dw1); dump("db1", db1); dump("dw2", dw2); dump("db2", db2);
    dump("zbar", zbar); dump("csum", csum); dump("spread", spread); dump("pred", pred); dump("prob", prob);
    printf("ok %s\n", dir.c_str());
}
