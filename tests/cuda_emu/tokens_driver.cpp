// Runs kernels/tokens.cu under the CPU emulator (cuda_bf16.h) on random inputs and dumps inputs
// and outputs as raw little-endian f32 files for tests/tokens_emulated.rs, which compares them
// with the CpuBackend ops. Launch shapes as src/ops/tokens/cuda.rs (grid-stride kernels on a
// small grid, so every thread loops; attention one 128-thread block per query row).
//   tokens_driver DIR SEED
#include "cuda_bf16.h"
inline float emu_dyn_smem[1 << 14];
#define DYNAMIC_SMEM(name) float* name = emu_dyn_smem
inline float __expf(float x) { return expf(x); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
#include "tokens.cu"
#include <cstdio>
#include <random>
#include <string>
#include <sys/stat.h>
static std::mt19937 rng;
static std::string dir;
std::vector<float> uni(size_t n) { std::uniform_real_distribution<float> d(-2, 2); std::vector<float> v(n); for (auto& x : v) x = d(rng); return v; }
void dump(const std::string& name, const std::vector<float>& v) { FILE* f = fopen((dir + "/" + name).c_str(), "wb"); fwrite(v.data(), 4, v.size(), f); fclose(f); }
// Grid-stride kernels: 3 blocks of 64 threads, fewer threads than elements.
void grid(const std::function<void()>& k) { emu_launch({3, 1, 1}, 64, k); }
int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: tokens_driver DIR SEED\n"); return 2; }
    dir = argv[1];
    rng.seed(strtoul(argv[2], nullptr, 10));
    mkdir(dir.c_str(), 0755);
    {  // patchify B 2, C 3, H 12, W 8, p 4
        auto img = uni(2 * 3 * 12 * 8); std::vector<float> out(img.size(), NAN);
        grid([&] { tok_patchify(img.data(), out.data(), out.size(), 3, 12, 8, 4); });
        dump("patchify_in", img); dump("patchify_out", out);
    }
    const unsigned B = 2, NP = 6, P = 3, D = 5, N = 1 + P + NP, L = 3;
    {  // embed
        auto pa = uni(B * NP * D), cls = uni(D), pos = uni((1 + NP) * D), x0 = uni(B * N * D); auto x = x0;
        grid([&] { tok_embed(pa.data(), cls.data(), pos.data(), x.data(), (uint64_t)B * (1 + NP) * D, NP, P, D); });
        dump("embed_patches", pa); dump("embed_cls", cls); dump("embed_pos", pos); dump("embed_x0", x0); dump("embed_x", x);
    }
    {  // set_prompts, layer 1
        auto pr = uni(L * P * D), x0 = uni(B * N * D); auto x = x0;
        grid([&] { tok_set_prompts(pr.data() + 1 * P * D, x.data(), (uint64_t)B * P * D, N, P, D); });
        dump("setp_prompts", pr); dump("setp_x0", x0); dump("setp_x", x);
    }
    {  // prompt_grad, layer 1, zero rows
        auto dx0 = uni(B * N * D), dp0 = uni(L * P * D); auto dx = dx0; auto dp = dp0;
        grid([&] { tok_prompt_grad(dx.data(), dp.data() + 1 * P * D, (uint64_t)P * D, B, N, D); });
        grid([&] { tok_zero_prompts(dx.data(), (uint64_t)B * P * D, N, P, D); });
        dump("pg_dx0", dx0); dump("pg_dp0", dp0); dump("pg_dx", dx); dump("pg_dp", dp);
    }
    {  // copy_tokens: rows 1..1+P of N into rows 0..P of P, and back into a fresh N
        auto src = uni(B * N * D), d0 = uni(B * P * D), e0 = uni(B * N * D); auto d = d0; auto e = e0;
        grid([&] { tok_copy_tokens(src.data(), d.data(), (uint64_t)B * P * D, N, 1, P, 0, P, D); });
        grid([&] { tok_copy_tokens(d.data(), e.data(), (uint64_t)B * P * D, P, 0, N, 1, P, D); });
        dump("ct_src", src); dump("ct_d0", d0); dump("ct_e0", e0); dump("ct_d", d); dump("ct_e", e);
    }
    {  // residual with and without LayerScale, mul_cols, axpby, fill: rows 7, dim 5
        const unsigned R = 7;
        auto x = uni(R * D), f = uni(R * D), ls = uni(D);
        std::vector<float> o1(R * D, NAN), o2(R * D, NAN), o3(R * D, NAN);
        grid([&] { tok_residual(x.data(), f.data(), ls.data(), o1.data(), (uint64_t)R * D, D); });
        grid([&] { tok_residual(x.data(), f.data(), nullptr, o2.data(), (uint64_t)R * D, D); });
        grid([&] { tok_mul_cols(x.data(), ls.data(), o3.data(), (uint64_t)R * D, D); });
        auto y0 = uni(R * D); auto y = y0;
        grid([&] { tok_axpby(0.75f, y.data(), -1.25f, x.data(), (uint64_t)R * D); });
        auto z0 = uni(R * D); auto z = z0;
        grid([&] { tok_fill(z.data(), 0.375f, (uint64_t)R * D - 3); });
        dump("ew_x", x); dump("ew_f", f); dump("ew_ls", ls); dump("ew_res_ls", o1); dump("ew_res", o2); dump("ew_mul", o3);
        dump("ew_y0", y0); dump("ew_axpby", y); dump("ew_z0", z0); dump("ew_fill", z);
    }
    {  // plain attention: B 2, N 9, h 2, dh 3, prompts 1..4; full and prompt-row queries
        const int AB = 2, AN = 9, H = 2, DH = 3, AD = H * DH, PS = 1, PE = 4;
        auto qkv = uni(AB * AN * 3 * AD);
        dump("att_qkv", qkv);
        for (int c = 0; c < 2; c++) {
            int q0 = c == 0 ? 0 : 1, nq = c == 0 ? AN : PE - PS;
            auto dout = uni(AB * nq * AD);
            std::vector<float> out(AB * nq * AD, NAN), lse(AB * H * nq, NAN), dqkv(qkv.size(), 0.0f);
            float scale = 1.0f / sqrtf((float)DH);
            emu_launch({(unsigned)nq, (unsigned)(AB * H), 1}, 128, [&] { attn_simple_fwd(qkv.data(), out.data(), lse.data(), AN, H, DH, PS, PE, q0, nq, scale); });
            emu_launch({(unsigned)nq, (unsigned)(AB * H), 1}, 128, [&] { attn_simple_bwd(qkv.data(), out.data(), lse.data(), dout.data(), dqkv.data(), AN, H, DH, PS, PE, q0, nq, scale); });
            std::string t = std::to_string(c);
            dump("att_dout" + t, dout); dump("att_out" + t, out); dump("att_lse" + t, lse); dump("att_dqkv" + t, dqkv);
        }
    }
    printf("ok %s\n", dir.c_str());
}
