// Runs kernels/adamw.cu (adamw_multi_f32) under the CPU emulator (cuda_bf16.h) for
// tests/adamw_emulated.rs: four tensors of 1, 0, 37 and 300 elements (an empty one between)
// in one launch of 2 blocks x 64 threads (so threads loop and cross tensor boundaries), three
// ways: no guard, a NaN guard (nothing may change) and a finite guard. Dumps raw f32.
//   adamw_driver DIR SEED decay step_size inv_sqrt_bc2 beta1 beta2 eps one_minus_beta1 one_minus_beta2
#include "cuda_bf16.h"
#include "adamw.cu"
#include <cstdio>
#include <random>
#include <string>
#include <sys/stat.h>
static std::mt19937 rng;
static std::string dir;
std::vector<float> uni(size_t n, float lo, float hi) { std::uniform_real_distribution<float> d(lo, hi); std::vector<float> v(n); for (auto& x : v) x = d(rng); return v; }
void dump(const std::string& name, const std::vector<float>& v) { FILE* f = fopen((dir + "/" + name).c_str(), "wb"); fwrite(v.data(), 4, v.size(), f); fclose(f); }

int main(int argc, char** argv) {
    if (argc != 11) { fprintf(stderr, "usage: adamw_driver DIR SEED decay step_size inv_sqrt_bc2 beta1 beta2 eps omb1 omb2\n"); return 2; }
    dir = argv[1];
    rng.seed(strtoul(argv[2], nullptr, 10));
    float s[8];
    for (int i = 0; i < 8; i++) s[i] = strtof(argv[3 + i], nullptr);
    mkdir(dir.c_str(), 0755);
    const size_t sizes[4] = {1, 0, 37, 300};
    std::vector<float> p0[4], g[4], m0[4], v0[4];
    for (int t = 0; t < 4; t++) {
        p0[t] = uni(sizes[t], -1, 1); g[t] = uni(sizes[t], -1, 1); m0[t] = uni(sizes[t], -0.1f, 0.1f); v0[t] = uni(sizes[t], 0, 0.01f);
        std::string k = std::to_string(t);
        dump("p0_" + k, p0[t]); dump("g_" + k, g[t]); dump("m0_" + k, m0[t]); dump("v0_" + k, v0[t]);
    }
    const char* modes[3] = {"none", "nan", "finite"};
    for (int mode = 0; mode < 3; mode++) {
        std::vector<float> p[4], m[4], v[4];
        AdamWTensors ts{};
        uint64_t total = 0;
        for (int t = 0; t < 4; t++) {
            p[t] = p0[t]; m[t] = m0[t]; v[t] = v0[t];
            ts.p[t] = p[t].data(); ts.g[t] = g[t].data(); ts.m[t] = m[t].data(); ts.v[t] = v[t].data();
            ts.start[t] = total;
            total += sizes[t];
        }
        for (int t = 4; t <= ADAMW_MAX_TENSORS; t++) ts.start[t] = total;
        float guard = mode == 1 ? NAN : 3.5f;
        const float* gp = mode == 0 ? nullptr : &guard;
        emu_launch({2, 1, 1}, 64, [&] { adamw_multi_f32(ts, 4, gp, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]); });
        for (int t = 0; t < 4; t++) {
            std::string k = std::string(modes[mode]) + "_" + std::to_string(t);
            dump("p_" + k, p[t]); dump("m_" + k, m[t]); dump("v_" + k, v[t]);
        }
    }
    printf("ok %s\n", dir.c_str());
}
