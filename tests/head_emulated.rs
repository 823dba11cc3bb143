//! The head kernels' CUDA source (`kernels/head.cu`) run on the CPU, no GPU needed: the C++
//! driver `tests/cuda_emu/head_driver.cpp` compiles head.cu against a small CUDA emulation
//! (`tests/cuda_emu/cuda_bf16.h`: one std::thread per CUDA thread, barriers for
//! `__syncthreads` and warp shuffles; `emu_ptx.h` for the tensor-core kernels of
//! `kernels/moe_mma.cu` and `kernels/adapter_mma.cu`), launches every head kernel, both
//! sets (fp32 and tensor-core), with the grids of
//! `src/ops/head/cuda.rs` on random inputs, and dumps inputs and outputs; this test compares
//! them with the CPU reference (`ops::head::cpu`, f64). It checks the kernels' indexing,
//! bounds, tiling edges and barrier structure, not GPU timing or the memory model (the GPU
//! tests in tests/gpu_head.rs do that on a device). Needs a C++20 compiler (`CXX`, else g++
//! or c++); without one it says so and passes.

use mlvpt::ops::head::{cpu, AdapterShape, MoeShape, VptHeadShape};
use std::path::Path;

mod cuda_emu;
mod head_common;
use cuda_emu::read_u32;
use head_common::{adapter_terms, moe_param_terms, SumBound};

fn read_f64(dir: &Path, name: &str) -> Vec<f64> {
    cuda_emu::read_f32(dir, name).into_iter().map(f64::from).collect()
}

/// Fails unless every |got - want| <= atol + rtol |want| (NaN fails), naming the worst.
fn close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    within(what, got, want, |i| atol + rtol * want[i].abs());
}

/// Fails unless every |got[i] - want[i]| <= bound(i) (NaN fails), naming the worst.
fn within(what: &str, got: &[f64], want: &[f64], bound: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst: Option<(usize, f64)> = None;
    let mut bad = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let excess = if err.is_nan() { f64::INFINITY } else { err - bound(i) };
        if excess > 0.0 {
            bad += 1;
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!("{what}: {bad} of {} off; worst [{i}]: got {}, want {}, bound {}", got.len(), got[i], want[i], bound(i));
    }
}

/// [`close`] with the bound of a sum ([`head_common::SumBound`]) added.
fn close_sum(what: &str, got: &[f64], want: &[f64], bound: SumBound, atol: f64, rtol: f64) {
    within(what, got, want, |i| bound.at(i, want[i], atol, rtol));
}

const BF16_RTOL: f64 = 1.0 / 128.0;

/// Compares one dump with the CPU reference. `dot_tol` bounds the fp32 dot products u, q, r
/// and y, m (absolute and relative): fp32 sums for head.cu's kernels; the tensor-core kernels
/// (moe_mma.cu, adapter_mma.cu) carry fp32 operands as two bf16 (about 2^-17 relative each), so
/// their dot products may be off by ~2^-17 of the sum of |terms|, which exceeds an fp32
/// tolerance where the terms cancel.
fn check(dir: &Path, what: &str, dot_tol: f64) {
    let sh: Vec<usize> = std::fs::read_to_string(dir.join("shape")).unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect();
    let (bn, t, e, k, d, r, rows) = (sh[0], sh[1], sh[2], sh[3], sh[4], sh[5], sh[7]);
    let p = 2 * t * e;
    let g = |n: &str| read_f64(dir, n);
    let tok = read_u32(dir, "tok");
    let grow = read_u32(dir, "grow");
    #[cfg(feature = "cuda")]
    {
        // The driver's inverse table is the one the launcher uploads.
        let (off, items) = mlvpt::ops::head::cuda::invert_table(&tok, p).unwrap();
        assert_eq!((off, items), (read_u32(dir, "tok_offsets"), read_u32(dir, "tok_items")), "{what}: inverse table");
    }
    let mut scratch = Vec::new();

    let ash = AdapterShape { batch: bn, tokens: p, dim: d, rank: r };
    let (mut u, mut ad) = (vec![0.0; bn * p * r], vec![0.0; bn * p * d]);
    cpu::adapter_forward(&g("z"), &g("w1"), &g("b1"), &g("w2"), &g("b2"), &mut u, &mut ad, &ash, &mut scratch);
    close(&format!("{what}: u"), &g("u"), &u, dot_tol, dot_tol);
    close(&format!("{what}: adapted"), &g("adapted"), &ad, 1e-3, BF16_RTOL);

    let ms = MoeShape { batch: bn, tokens: p, dim: d, labels: k, experts: e, gate_rows: rows };
    let (mut y, mut m, mut q, mut rr) = (vec![0.0; bn * k], vec![0.0; bn * k], vec![0.0; bn * e * k], vec![0.0; bn * e * k]);
    cpu::moe_forward(&g("z"), &g("adapted"), &g("gate"), &g("w"), &g("c"), &tok, &grow, &mut y, &mut m, &mut q, &mut rr, &ms);
    for (name, want) in [("q", &q), ("r", &rr), ("y", &y), ("m", &m)] {
        close(&format!("{what}: {name}"), &g(name), want, dot_tol, dot_tol);
    }
    let (mut dz, mut da) = (g("dz0"), g("da0"));
    let (mut dg, mut dw, mut dc) = (vec![0.0; rows * d], vec![0.0; k * d], vec![0.0; k]);
    cpu::moe_backward(&g("dy"), &g("dm"), &g("z"), &g("adapted"), &g("gate"), &g("w"), &tok, &grow, &g("q"), &g("r"), &mut dz, &mut da, &mut dg, &mut dw, &mut dc, &ms, &mut scratch);
    close(&format!("{what}: dz"), &g("dz"), &dz, 1e-3, BF16_RTOL);
    close(&format!("{what}: dadapted"), &g("da"), &da, 1e-3, BF16_RTOL);
    // dgate and dw: sums over images and pairs of dq z and dr adapted (dq, dr from the
    // reference's scratch, as moe_backward documents).
    let (dq, dr) = (&scratch[..bn * e * k], &scratch[bn * e * k..2 * bn * e * k]);
    let (tg, tw) = moe_param_terms(dq, dr, &g("z"), &g("adapted"), &tok, &grow, &ms);
    close_sum(&format!("{what}: dgate"), &g("dgate"), &dg, SumBound::of(&tg), 1e-4, 1e-4);
    close_sum(&format!("{what}: dw"), &g("dw"), &dw, SumBound::of(&tw), 1e-4, 1e-4);
    close(&format!("{what}: dc"), &g("dc"), &dc, 1e-5, 1e-5);

    let mut dz2 = g("dz2_0");
    let (mut dw1, mut db1, mut dw2, mut db2) = (vec![0.0; p * r * d], vec![0.0; p * r], vec![0.0; p * d * r], vec![0.0; p * d]);
    cpu::adapter_backward(&g("dout"), &g("z"), &g("u"), &g("w1"), &g("w2"), &mut dz2, &mut dw1, &mut db1, &mut dw2, &mut db2, &ash, &mut scratch);
    close(&format!("{what}: adapter dz"), &g("dz2"), &dz2, 1e-3, BF16_RTOL);
    // The kernel's du (a sum over D) on its own, then the parameter gradients (sums over
    // images), with what du's error carries into dW1 and db1.
    let duk = g("du");
    let at = adapter_terms(&g("dout"), &g("z"), &g("u"), &g("w2"), Some(&duk), &ash);
    close_sum(&format!("{what}: du"), &duk, &at.du, SumBound::of(&at.du_terms), 1e-5, 1e-5);
    close_sum(&format!("{what}: dw1"), &g("dw1"), &dw1, SumBound::with(&at.dw1), 1e-4, 1e-4);
    close_sum(&format!("{what}: db1"), &g("db1"), &db1, SumBound::with(&at.db1), 1e-4, 1e-4);
    close_sum(&format!("{what}: dw2"), &g("dw2"), &dw2, SumBound::of(&at.dw2), 1e-4, 1e-4);
    close_sum(&format!("{what}: db2"), &g("db2"), &db2, SumBound::of(&at.db2), 1e-4, 1e-4);

    let vs = VptHeadShape { batch: bn, tokens: p, dim: d, labels: k };
    let (mut zbar, mut yv) = (vec![0.0; bn * d], vec![0.0; bn * k]);
    cpu::vpt_forward(&g("z"), &g("w"), &g("c"), &mut zbar, &mut yv, &vs);
    close(&format!("{what}: zbar"), &g("zbar"), &zbar, 1e-6, 1e-5);
    let dy = g("dy");
    let sums: Vec<f64> = (0..k).map(|ki| (0..bn).map(|b| dy[b * k + ki]).sum()).collect();
    close(&format!("{what}: column sums"), &g("csum"), &sums, 1e-5, 1e-5);
    let zb = g("zbar");
    let spread: Vec<f64> = (0..bn * p * d).map(|i| zb[(i / (p * d)) * d + i % d] / p as f64).collect();
    close(&format!("{what}: spread"), &g("spread"), &spread, 1e-6, BF16_RTOL);
    let (ys, mss) = (g("y"), g("m"));
    let pred: Vec<f64> = ys.iter().zip(&mss).map(|(a, b)| 0.5 * (a + b)).collect();
    close(&format!("{what}: predict y"), &g("pred"), &pred, 1e-6, 1e-6);
    let prob: Vec<f64> = pred.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
    close(&format!("{what}: predict prob"), &g("prob"), &prob, 1e-6, 1e-5);
}

#[test]
fn head_kernels_run_on_the_cpu_emulator_and_match_the_reference() {
    let Some(driver) = cuda_emu::build("head_emulated", "head_driver") else {
        return;
    };
    let seed = driver.seed;
    // (B, T, E, K, D, r, label gating): partial image tiles (37 = 32 + 5) with a lane owning
    // one chunk of a short row (D = 72); two chunks per lane (D = 264), rank groups of 4 with a
    // remainder (r = 13), several and partial pair tiles (K/T = 20) under group gating; the
    // widest row (D = 1024) with E = 8. For the tensor-core kernels (64 x 64 tiles, steps of 32):
    // two image tiles, the second partial, and a batch of 2 steps + 6 (B = 70); over 64 pairs
    // per token (K/T = 75); a row of 2 steps + 8 and a partial column tile (D = 72, 264); for
    // the tensor-core adapters (16 images a block, 16-column chunks a warp): half a chunk at the
    // end of a row (D = 72, 264), 16 chunks a warp (D = 1024), and r = 37 (5 rank tiles, 3
    // steps of the up-projection).
    let cases = [
        (37, 2, 3, 7, 72, 5, true),
        (17, 2, 3, 40, 264, 13, false),
        (9, 1, 8, 5, 1024, 1, true),
        (70, 2, 3, 150, 72, 37, false),
    ];
    for (kernels, dot_tol) in [("fp32", 1e-5), ("mma", 1e-4)] {
        for (i, &(bn, t, e, k, d, r, label)) in cases.iter().enumerate() {
            let gating = if label { "label" } else { "group" };
            let what = format!("{kernels} kernels, B={bn} T={t} E={e} K={k} D={d} r={r} {gating} (seed {seed})");
            let mut args: Vec<String> = [bn, t, e, k, d, r, label as usize].iter().map(|v| v.to_string()).collect();
            args.push(seed.wrapping_add(i as u32).to_string());
            args.push(kernels.to_string());
            let dir = driver.run(&format!("{kernels}{i}"), &args);
            check(&dir, &what, dot_tol);
        }
    }
}
