//! The AdamW kernel's CUDA source (`kernels/adamw.cu`, every trainable tensor in one launch,
//! optionally guarded by the loss) run on the CPU, no GPU needed: `tests/cuda_emu/adamw_driver.cpp`
//! compiles it against the CUDA emulation of `tests/cuda_emu/cuda_bf16.h` and updates four
//! tensors (1, 0, 37, 300 elements) in one launch without a guard, with a NaN guard and with a
//! finite one; this test compares each with the CPU reference (`ops::adamw::cpu::step`), given
//! the kernel the scalars the launcher computes (`ops::adamw::kernel_scalars`). Needs a C++20
//! compiler; without one it says so and passes.

use mlvpt::ops::adamw::{cpu, kernel_scalars, AdamWConfig};

mod cuda_emu;
use cuda_emu::read_f32 as read;

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        // Both in f32; the kernel's fused multiply-adds and its `sqrt(v) / sqrt(bc2)` order
        // differ from the reference by a few roundings.
        assert!((g - w).abs() <= 1e-6 + 1e-5 * w.abs(), "{what}: element {i}: emulated kernel {g}, CPU {w}");
    }
}

#[test]
fn adamw_kernel_runs_on_the_cpu_emulator_and_matches_the_cpu_reference() {
    let Some(driver) = cuda_emu::build("adamw_emulated", "adamw_driver") else {
        return;
    };
    let (step, lr) = (3u64, 0.05);
    let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let mut args = vec![driver.seed.to_string()];
    args.extend(kernel_scalars(step, lr, &cfg).iter().map(|v| format!("{v:e}")));
    let dir = driver.run("run", &args);
    let seed = driver.seed;
    for t in 0..4 {
        let g = |name: &str| read(&dir, &format!("{name}_{t}"));
        let (p0, grad, m0, v0) = (g("p0"), g("g"), g("m0"), g("v0"));
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        cpu::step(&mut p, &grad, &mut m, &mut v, step, lr, &cfg);
        for mode in ["none", "finite"] {
            let what = |x: &str| format!("seed {seed}, tensor {t}, guard {mode}: {x}");
            close(&what("p"), &g(&format!("p_{mode}")), &p);
            close(&what("m"), &g(&format!("m_{mode}")), &m);
            close(&what("v"), &g(&format!("v_{mode}")), &v);
        }
        // A non-finite guard (the loss): nothing changes.
        for (name, before) in [("p", &p0), ("m", &m0), ("v", &v0)] {
            assert_eq!(&g(&format!("{name}_nan")), before, "seed {seed}, tensor {t}: {name} changed under a NaN guard");
        }
    }
}
