// Runs kernels/layernorm.cu under the CPU emulator (cuda_bf16.h) on random inputs and dumps
// inputs and outputs as raw little-endian f32 files for tests/layernorm_emulated.rs, which
// compares them with the CPU reference (src/ops/layernorm/cpu.rs). Every kernel family: storage
// S = fp32 ("f32x") and bf16, the scalar kernel (VEC 1) and the 16-byte ones (VEC 8, 1 and 3
// chunks per lane), 2 blocks of 2 warps over 5 rows (so warps loop over rows).
//   layernorm_driver DIR SEED
#include "cuda_bf16.h"
#include "layernorm.cu"
#include <cstdio>
#include <random>
#include <string>
#include <sys/stat.h>
static std::mt19937 rng;
static std::string dir;
std::vector<float> uni(size_t n, float lo, float hi) { std::uniform_real_distribution<float> d(lo, hi); std::vector<float> v(n); for (auto& x : v) x = d(rng); return v; }
void dump(const std::string& name, const std::vector<float>& v) { FILE* f = fopen((dir + "/" + name).c_str(), "wb"); fwrite(v.data(), 4, v.size(), f); fclose(f); }
// Storage of S: round to bf16 and widen back (exact) for the dumps; fp32 unchanged.
template <class S> std::vector<S> store(const std::vector<float>& v);
template <> std::vector<float> store<float>(const std::vector<float>& v) { return v; }
template <> std::vector<bf16> store<bf16>(const std::vector<float>& v) { std::vector<bf16> o(v.size()); for (size_t i = 0; i < v.size(); i++) o[i] = __float2bfloat16_rn(v[i]); return o; }
float widen(float v) { return v; }
float widen(bf16 v) { return __bfloat162float(v); }
template <class S> std::vector<float> wide(const std::vector<S>& v) { std::vector<float> o(v.size()); for (size_t i = 0; i < v.size(); i++) o[i] = widen(v[i]); return o; }

template <class S, int VEC, int NCH>
void run(const std::string& tag, uint32_t d) {
    const uint32_t rows = 5;
    const size_t n = (size_t)rows * d;
    // An offset mean and a spread, so the centring matters.
    auto x = store<S>(uni(n, 1.0f, 4.0f));
    auto gamma = uni(d, 0.5f, 1.5f), beta = uni(d, -1.0f, 1.0f);
    std::vector<bf16> y(n);
    std::vector<float> mean(rows, NAN), rstd(rows, NAN);
    const float eps = 1e-6f;
    emu_launch({2, 1, 1}, 64, [&] { layernorm_fwd<VEC, NCH, S>(x.data(), gamma.data(), beta.data(), y.data(), mean.data(), rstd.data(), rows, d, eps); });
    auto dy = store<bf16>(uni(n, -1.0f, 1.0f));
    auto dx0 = store<S>(uni(n, -1.0f, 1.0f));
    auto dx = dx0;
    emu_launch({2, 1, 1}, 64, [&] { layernorm_bwd<VEC, NCH, S>(dy.data(), x.data(), gamma.data(), mean.data(), rstd.data(), dx.data(), rows, d, 1); });
    auto dxw = store<S>(std::vector<float>(n, NAN));
    emu_launch({2, 1, 1}, 64, [&] { layernorm_bwd<VEC, NCH, S>(dy.data(), x.data(), gamma.data(), mean.data(), rstd.data(), dxw.data(), rows, d, 0); });
    dump(tag + "_x", wide(x)); dump(tag + "_gamma", gamma); dump(tag + "_beta", beta);
    dump(tag + "_y", wide(y)); dump(tag + "_mean", mean); dump(tag + "_rstd", rstd);
    dump(tag + "_dy", wide(dy)); dump(tag + "_dx0", wide(dx0)); dump(tag + "_dx", wide(dx)); dump(tag + "_dxw", wide(dxw));
}

// The fused residual + forward: out = x + ls * f (ls present or not), then LayerNorm of out.
template <class F, int VEC, int NCH>
void run_res(const std::string& tag, uint32_t d, bool with_ls) {
    const uint32_t rows = 5;
    const size_t n = (size_t)rows * d;
    auto x = uni(n, 1.0f, 4.0f);
    auto f = store<F>(uni(n, -2.0f, 2.0f));
    auto ls = uni(d, 0.1f, 1.0f);
    auto gamma = uni(d, 0.5f, 1.5f), beta = uni(d, -1.0f, 1.0f);
    std::vector<float> out(n, NAN), mean(rows, NAN), rstd(rows, NAN);
    std::vector<bf16> y(n);
    emu_launch({2, 1, 1}, 64, [&] { layernorm_res_fwd<VEC, NCH, F>(x.data(), f.data(), with_ls ? ls.data() : nullptr, out.data(), gamma.data(), beta.data(), y.data(), mean.data(), rstd.data(), rows, d, 1e-6f); });
    dump(tag + "_x", x); dump(tag + "_f", wide(f)); dump(tag + "_ls", with_ls ? ls : std::vector<float>());
    dump(tag + "_gamma", gamma); dump(tag + "_beta", beta);
    dump(tag + "_out", out); dump(tag + "_y", wide(y)); dump(tag + "_mean", mean); dump(tag + "_rstd", rstd);
}

int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: layernorm_driver DIR SEED\n"); return 2; }
    dir = argv[1];
    rng.seed(strtoul(argv[2], nullptr, 10));
    mkdir(dir.c_str(), 0755);
    // Tags: storage, d (the test reads the same list).
    run<float, 1, 32>("f32_13", 13);
    run<float, 8, 1>("f32_40", 40);
    run<float, 8, 3>("f32_520", 520);
    run<bf16, 1, 32>("bf16_13", 13);
    run<bf16, 8, 1>("bf16_40", 40);
    run<bf16, 8, 3>("bf16_520", 520);
    // Tags: res, branch storage, d, ls or not.
    run_res<float, 1, 32>("res_f32_13_ls", 13, true);
    run_res<float, 8, 1>("res_f32_40_nols", 40, false);
    run_res<bf16, 8, 3>("res_bf16_520_ls", 520, true);
    run_res<bf16, 1, 32>("res_bf16_13_nols", 13, false);
    printf("ok %s\n", dir.c_str());
}
