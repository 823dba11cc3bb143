//! The token and plain-attention kernels' CUDA source (`kernels/tokens.cu`) run on the CPU, no
//! GPU needed: `tests/cuda_emu/tokens_driver.cpp` compiles tokens.cu against the small CUDA
//! emulation of `tests/cuda_emu/cuda_bf16.h` (one std::thread per CUDA thread, barriers for
//! `__syncthreads` and shuffles), launches every kernel (the `_f32` and the `_bf16`
//! instantiations) on random inputs and dumps inputs and outputs; this test compares them with
//! the `CpuBackend` ops they implement. It checks
//! indexing, bounds and barrier structure, not the GPU memory model (tests/gpu_backend.rs does
//! that on a device). Needs a C++20 compiler (`CXX`, else g++ or c++); without one it says so
//! and passes.

use mlvpt::backend::{AttnShape, Backend, CpuBackend};
use std::path::Path;

mod cuda_emu;
use cuda_emu::read_f32 as read;

/// Fails unless every |got - want| <= atol + rtol |want| (NaN fails), naming the element.
fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs();
        assert!(ok, "{what}: element {i}: emulated kernel {g}, CPU {w}");
    }
}

fn check(dir: &Path, what: &str) {
    let g = |n: &str| read(dir, n);
    let mut be = CpuBackend::<f32>::new();
    let exact = |name: &str, got: &[f32], want: &[f32]| close(&format!("{what}: {name}"), got, want, 0.0, 0.0);

    let img = g("patchify_in");
    let mut out = vec![0.0; img.len()];
    be.patchify(&img, &mut out, 2, 3, 12, 8, 4);
    exact("patchify", &g("patchify_out"), &out);

    let (b, np, p, d, l) = (2usize, 6usize, 3usize, 5usize, 3usize);
    let n = 1 + p + np;
    let mut x = g("embed_x0");
    be.embed_tokens(&g("embed_patches"), &g("embed_cls"), &g("embed_pos"), &mut x, b, np, p, d);
    exact("embed_tokens", &g("embed_x"), &x);

    let mut x = g("setp_x0");
    be.set_prompts(&g("setp_prompts"), 1, &mut x, b, n, p, d);
    exact("set_prompts", &g("setp_x"), &x);

    let (mut dx, mut dp) = (g("pg_dx0"), g("pg_dp0"));
    assert_eq!(dp.len(), l * p * d);
    be.prompt_grad(&mut dx, &mut dp, 1, b, n, p, d, true);
    exact("prompt_grad dx", &g("pg_dx"), &dx);
    close(&format!("{what}: prompt_grad dprompts"), &g("pg_dp"), &dp, 1e-6, 1e-6);

    let (src, mut dd, mut ee) = (g("ct_src"), g("ct_d0"), g("ct_e0"));
    be.copy_tokens(&src, n, 1, &mut dd, p, 0, p, b, d);
    be.copy_tokens(&dd, p, 0, &mut ee, n, 1, p, b, d);
    exact("copy_tokens out", &g("ct_d"), &dd);
    exact("copy_tokens back", &g("ct_e"), &ee);

    let rows = 7;
    let (xx, f, ls) = (g("ew_x"), g("ew_f"), g("ew_ls"));
    let mut o = vec![0.0; rows * d];
    be.residual(&xx, &f, Some(&ls), &mut o, rows, d);
    close(&format!("{what}: residual with ls"), &g("ew_res_ls"), &o, 1e-6, 1e-6);
    be.residual(&xx, &f, None, &mut o, rows, d);
    exact("residual", &g("ew_res"), &o);
    be.mul_cols(&xx, &ls, &mut o, rows, d);
    exact("mul_cols", &g("ew_mul"), &o);
    let mut y = g("ew_y0");
    be.axpby(0.75, &mut y, -1.25, &xx, rows * d);
    close(&format!("{what}: axpby"), &g("ew_axpby"), &y, 1e-6, 1e-6);
    let mut z = g("ew_z0");
    be.fill(&mut z, rows * d - 3, 0.375);
    exact("fill", &g("ew_fill"), &z);

    check_bf16(dir, what);

    let qkv = g("att_qkv");
    for (c, (q_start, q_len)) in [(0usize, 9usize), (1, 3)].into_iter().enumerate() {
        let sh = AttnShape { batch: 2, tokens: 9, heads: 2, head_dim: 3, prompt_start: 1, prompt_end: 4, q_start, q_len };
        let dout = g(&format!("att_dout{c}"));
        let (mut out, mut lse, mut dqkv) = (vec![0.0; 2 * q_len * 6], vec![0.0; 2 * 2 * q_len], vec![0.0; qkv.len()]);
        be.attention_forward(&qkv, &mut out, &mut lse, &sh);
        be.attention_backward(&qkv, &out, &lse, &dout, &mut dqkv, &sh);
        close(&format!("{what}: attention out (queries {q_start}+{q_len})"), &g(&format!("att_out{c}")), &out, 1e-5, 1e-5);
        close(&format!("{what}: attention lse (queries {q_start}+{q_len})"), &g(&format!("att_lse{c}")), &lse, 1e-5, 1e-5);
        close(&format!("{what}: attention dqkv (queries {q_start}+{q_len})"), &g(&format!("att_dqkv{c}")), &dqkv, 1e-5, 1e-4);
    }
}

/// `v` rounded to bf16 (round to nearest even, as the kernels store) and widened back.
fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// The `_bf16` instantiations (bf16 storage of the varying operand, fp32 math) against the CPU
/// ops on the same (bf16-representable) inputs; bf16 outputs are compared with the CPU result
/// rounded to bf16, within one bf16 step (the rounding of an fp32 result that an fma changed in
/// its last bit may go the other way).
fn check_bf16(dir: &Path, what: &str) {
    let g = |n: &str| read(dir, &format!("bf_{n}"));
    let mut be = CpuBackend::<f32>::new();
    let exact = |name: &str, got: &[f32], want: &[f32]| close(&format!("{what}: {name} (bf16)"), got, want, 0.0, 0.0);
    let one_step = |name: &str, got: &[f32], want: &[f32]| close(&format!("{what}: {name} (bf16)"), got, &round_bf16(want), 1e-6, 1.0 / 128.0);

    let img = g("patchify_in");
    let mut out = vec![0.0; img.len()];
    be.patchify(&img, &mut out, 2, 3, 12, 8, 4);
    exact("patchify", &g("patchify_out"), &out);

    let (b, np, p, d) = (2usize, 6usize, 3usize, 5usize);
    let n = 1 + p + np;
    let mut x = g("embed_x0");
    be.embed_tokens(&g("embed_patches"), &g("embed_cls"), &g("embed_pos"), &mut x, b, np, p, d);
    exact("embed_tokens", &g("embed_x"), &x);

    let mut dd = g("ct_d0");
    be.copy_tokens(&g("ct_src"), n, 1, &mut dd, p, 0, p, b, d);
    exact("copy_tokens", &g("ct_d"), &dd);

    let rows = 7;
    let (xx, f, ls) = (g("ew_x"), g("ew_f"), g("ew_ls"));
    let mut o = vec![0.0; rows * d];
    be.residual(&xx, &f, Some(&ls), &mut o, rows, d);
    close(&format!("{what}: residual with ls (bf16 f)"), &g("ew_res_ls"), &o, 1e-6, 1e-6);
    be.mul_cols(&xx, &ls, &mut o, rows, d);
    one_step("mul_cols", &g("ew_mul"), &o);

    let mut y = g("axpby_y0");
    be.axpby(0.75, &mut y, -1.25, &f, rows * d);
    close(&format!("{what}: axpby f32 += bf16"), &g("axpby_y"), &y, 1e-6, 1e-6);
    let mut y = g("axpby_yb0");
    be.axpby(0.75, &mut y, -1.25, &xx, rows * d);
    one_step("axpby bf16 += f32", &g("axpby_yb"), &y);

    let mut z = g("fill_z0");
    be.fill(&mut z, rows * d - 3, 0.375);
    exact("fill", &g("fill_z"), &z);
}

#[test]
fn token_kernels_run_on_the_cpu_emulator_and_match_the_cpu_backend() {
    let Some(driver) = cuda_emu::build("tokens_emulated", "tokens_driver") else {
        return;
    };
    let dir = driver.run("run", &[driver.seed.to_string()]);
    check(&dir, &format!("seed {}", driver.seed));
}
