//! The LayerNorm kernels' CUDA source (`kernels/layernorm.cu`) run on the CPU, no GPU needed:
//! `tests/cuda_emu/layernorm_driver.cpp` compiles layernorm.cu against the CUDA emulation of
//! `tests/cuda_emu/cuda_bf16.h` and runs every kernel family (input/gradient storage fp32 and
//! bf16; scalar and 16-byte vector kernels; the residual add fused into the forward) on
//! random inputs; this test compares the dumps
//! with the CPU reference (`ops::layernorm::cpu`, in f64). It checks indexing, the row loop,
//! the shuffles and the fp32/bf16 loads and stores, not the GPU memory model
//! (tests/gpu_kernels.rs does that on a device). Needs a C++20 compiler; without one it says so
//! and passes.

use mlvpt::backend::{Backend, CpuBackend};
use mlvpt::ops::layernorm::cpu;
use std::path::Path;

mod cuda_emu;
use cuda_emu::read_f32 as read;

/// Largest relative rounding error of a bf16 store (8 significant bits: half an ulp, 2^-8).
const BF16_ROUND: f64 = 1.0 / 256.0;

/// Fails unless every |got - want| <= atol + rtol |want|, naming the element.
fn close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = ((g as f64) - w).abs() <= atol + rtol * w.abs();
        assert!(ok, "{what}: element {i}: emulated kernel {g}, CPU reference {w}");
    }
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn check(dir: &Path, seed: u32, storage: &str, d: usize) {
    let tag = format!("{storage}_{d}");
    let what = |name: &str| format!("seed {seed}, {tag}: {name}");
    let g = |name: &str| read(dir, &format!("{tag}_{name}"));
    let rows = 5;
    let n = rows * d;
    let (x, gamma, beta) = (wide(&g("x")), wide(&g("gamma")), wide(&g("beta")));
    let (mut y, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    cpu::forward(&x, &gamma, &beta, &mut y, &mut mean, &mut rstd, rows, d, 1e-6);
    // y is stored in bf16 by every kernel.
    close(&what("y"), &g("y"), &y, 1e-6, BF16_ROUND + 1e-5);
    close(&what("mean"), &g("mean"), &mean, 1e-6, 1e-6);
    close(&what("rstd"), &g("rstd"), &rstd, 0.0, 1e-5);

    let dy = wide(&g("dy"));
    let mut dxw = vec![0.0; n];
    cpu::backward(&dy, &x, &gamma, &mean, &rstd, &mut dxw, rows, d, false);
    let mut dx = wide(&g("dx0"));
    cpu::backward(&dy, &x, &gamma, &mean, &rstd, &mut dx, rows, d, true);
    // dx is stored in `storage`: fp32 keeps the accumulated sum to f32 rounding, bf16 rounds it.
    // The absolute floor covers cancellation in g - mean(g) - xhat mean(g xhat).
    let scale = dxw.iter().fold(0f64, |m, v| m.max(v.abs()));
    let rtol = if storage == "bf16" { BF16_ROUND + 1e-5 } else { 1e-5 };
    close(&what("dx written"), &g("dxw"), &dxw, 1e-5 * scale, rtol);
    close(&what("dx accumulated"), &g("dx"), &dx, 1e-5 * scale, rtol);
}

/// The fused residual + forward against the CPU backend's `residual` then `layernorm_forward`
/// (in f64).
fn check_residual(dir: &Path, seed: u32, tag: &str, d: usize) {
    let what = |name: &str| format!("seed {seed}, {tag}: {name}");
    let g = |name: &str| read(dir, &format!("{tag}_{name}"));
    let rows = 5;
    let n = rows * d;
    let (x, f, ls) = (wide(&g("x")), wide(&g("f")), wide(&g("ls")));
    let mut be = CpuBackend::<f64>::new();
    let mut out = vec![0.0; n];
    be.residual(&x, &f, if ls.is_empty() { None } else { Some(&ls) }, &mut out, rows, d);
    // out is fp32: the kernel's sum in f32 against the f64 one.
    close(&what("out"), &g("out"), &out, 1e-6, 1e-6);
    let (mut y, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    // Normalise what the kernel wrote (its f32 sums), so only the LayerNorm is compared below.
    cpu::forward(&wide(&g("out")), &wide(&g("gamma")), &wide(&g("beta")), &mut y, &mut mean, &mut rstd, rows, d, 1e-6);
    close(&what("y"), &g("y"), &y, 1e-6, BF16_ROUND + 1e-5);
    close(&what("mean"), &g("mean"), &mean, 1e-6, 1e-6);
    close(&what("rstd"), &g("rstd"), &rstd, 0.0, 1e-5);
}

#[test]
fn layernorm_kernels_run_on_the_cpu_emulator_and_match_the_cpu_reference() {
    let Some(driver) = cuda_emu::build("layernorm_emulated", "layernorm_driver") else {
        return;
    };
    let seed = driver.seed;
    let dir = driver.run("run", &[seed.to_string()]);
    // The driver's cases: storage x row length (scalar kernel at 13, vector at 40 and 520).
    for storage in ["f32", "bf16"] {
        for d in [13, 40, 520] {
            check(&dir, seed, storage, d);
        }
    }
    for (tag, d) in [("res_f32_13_ls", 13), ("res_f32_40_nols", 40), ("res_bf16_520_ls", 520), ("res_bf16_13_nols", 13)] {
        check_residual(&dir, seed, tag, d);
    }
}
