// Runs kernels/tokens.cu under the CPU emulator (cuda_bf16.h) on random inputs and dumps inputs
// and outputs as raw little-endian f32 files for tests/tokens_emulated.rs, which compares them
// with the CpuBackend ops. Launch shapes as src/ops/tokens/cuda.rs (grid-stride kernels on a
// small grid, so every thread loops; attention one 128-thread block per query row).
//   tokens_driver DIR SEED
#include "cuda_bf16.h"
#define DYNAMIC_SMEM(name) float* name = reinterpret_cast<float*>(emu_dynamic_smem())
#include "tokens.cu"
#include <cstdio>
#include <random>
#include <string>
#include <sys/stat.h>
static std::mt19937 rng;
static std::string dir;
std::vector<float> uni(size_t n) { std::uniform_real_distribution<float> d(-2, 2); std::vector<float> v(n); for (auto& x : v) x = d(rng); return v; }
// bf16 storage: round to bf16 (as the kernels' stores) and widen back (exact) for the dumps.
std::vector<bf16> to_bf(const std::vector<float>& v) { std::vector<bf16> o(v.size()); for (size_t i = 0; i < v.size(); i++) o[i] = __float2bfloat16_rn(v[i]); return o; }
std::vector<float> from_bf(const std::vector<bf16>& v) { std::vector<float> o(v.size()); for (size_t i = 0; i < v.size(); i++) o[i] = __bfloat162float(v[i]); return o; }
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
        grid([&] { tok_patchify_f32(img.data(), out.data(), out.size(), 3, 12, 8, 4); });
        dump("patchify_in", img); dump("patchify_out", out);
    }
    const unsigned B = 2, NP = 6, P = 3, D = 5, N = 1 + P + NP, L = 3;
    {  // embed
        auto pa = uni(B * NP * D), cls = uni(D), pos = uni((1 + NP) * D), x0 = uni(B * N * D); auto x = x0;
        grid([&] { tok_embed_f32(pa.data(), cls.data(), pos.data(), x.data(), (uint64_t)B * (1 + NP) * D, NP, P, D); });
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
        grid([&] { tok_copy_tokens_f32(src.data(), d.data(), (uint64_t)B * P * D, N, 1, P, 0, P, D); });
        grid([&] { tok_copy_tokens_f32(d.data(), e.data(), (uint64_t)B * P * D, P, 0, N, 1, P, D); });
        dump("ct_src", src); dump("ct_d0", d0); dump("ct_e0", e0); dump("ct_d", d); dump("ct_e", e);
    }
    {  // residual with and without LayerScale, mul_cols, axpby, fill: rows 7, dim 5
        const unsigned R = 7;
        auto x = uni(R * D), f = uni(R * D), ls = uni(D);
        std::vector<float> o1(R * D, NAN), o2(R * D, NAN), o3(R * D, NAN);
        grid([&] { tok_residual_f32(x.data(), f.data(), ls.data(), o1.data(), (uint64_t)R * D, D); });
        grid([&] { tok_residual_f32(x.data(), f.data(), nullptr, o2.data(), (uint64_t)R * D, D); });
        grid([&] { tok_mul_cols_f32(x.data(), ls.data(), o3.data(), (uint64_t)R * D, D); });
        auto y0 = uni(R * D); auto y = y0;
        grid([&] { tok_axpby_f32_f32(0.75f, y.data(), -1.25f, x.data(), (uint64_t)R * D); });
        auto z0 = uni(R * D); auto z = z0;
        grid([&] { tok_fill_f32(z.data(), 0.375f, (uint64_t)R * D - 3); });
        dump("ew_x", x); dump("ew_f", f); dump("ew_ls", ls); dump("ew_res_ls", o1); dump("ew_res", o2); dump("ew_mul", o3);
        dump("ew_y0", y0); dump("ew_axpby", y); dump("ew_z0", z0); dump("ew_fill", z);
    }
    {  // bf16 instantiations: the same shapes, bf16 operands dumped widened to f32
        const unsigned R = 7;
        auto img = to_bf(uni(2 * 3 * 12 * 8)); std::vector<bf16> pout(img.size(), __float2bfloat16_rn(NAN));
        grid([&] { tok_patchify_bf16(img.data(), pout.data(), pout.size(), 3, 12, 8, 4); });
        dump("bf_patchify_in", from_bf(img)); dump("bf_patchify_out", from_bf(pout));
        auto pa = to_bf(uni(B * NP * D)); auto cls = uni(D), pos = uni((1 + NP) * D), x0 = uni(B * N * D); auto x = x0;
        grid([&] { tok_embed_bf16(pa.data(), cls.data(), pos.data(), x.data(), (uint64_t)B * (1 + NP) * D, NP, P, D); });
        dump("bf_embed_patches", from_bf(pa)); dump("bf_embed_cls", cls); dump("bf_embed_pos", pos); dump("bf_embed_x0", x0); dump("bf_embed_x", x);
        auto src = to_bf(uni(B * N * D)), d0 = to_bf(uni(B * P * D)); auto d = d0;
        grid([&] { tok_copy_tokens_bf16(src.data(), d.data(), (uint64_t)B * P * D, N, 1, P, 0, P, D); });
        dump("bf_ct_src", from_bf(src)); dump("bf_ct_d0", from_bf(d0)); dump("bf_ct_d", from_bf(d));
        auto rx = uni(R * D), ls = uni(D); auto rf = to_bf(uni(R * D));
        std::vector<float> o1(R * D, NAN); std::vector<bf16> o2(R * D, __float2bfloat16_rn(NAN));
        grid([&] { tok_residual_bf16(rx.data(), rf.data(), ls.data(), o1.data(), (uint64_t)R * D, D); });
        grid([&] { tok_mul_cols_bf16(rx.data(), ls.data(), o2.data(), (uint64_t)R * D, D); });
        dump("bf_ew_x", rx); dump("bf_ew_f", from_bf(rf)); dump("bf_ew_ls", ls); dump("bf_ew_res_ls", o1); dump("bf_ew_mul", from_bf(o2));
        auto y0 = uni(R * D); auto y = y0; auto yb0 = to_bf(uni(R * D)); auto yb = yb0;
        grid([&] { tok_axpby_f32_bf16(0.75f, y.data(), -1.25f, rf.data(), (uint64_t)R * D); });
        grid([&] { tok_axpby_bf16_f32(0.75f, yb.data(), -1.25f, rx.data(), (uint64_t)R * D); });
        dump("bf_axpby_y0", y0); dump("bf_axpby_y", y); dump("bf_axpby_yb0", from_bf(yb0)); dump("bf_axpby_yb", from_bf(yb));
        auto z0 = to_bf(uni(R * D)); auto z = z0;
        grid([&] { tok_fill_bf16(z.data(), 0.375f, (uint64_t)R * D - 3); });
        dump("bf_fill_z0", from_bf(z0)); dump("bf_fill_z", from_bf(z));
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
