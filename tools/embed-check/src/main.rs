//! What a CUDA Rust project gets from `mlvpt = { default-features = false, features = ["cuda"] }`:
//! an op's CPU twin, and the kernels with `GpuContext` to run them. Compiled by
//! tools/check-embed.sh; `cargo run` runs it (on a GPU, or the virtual device of tools/vgpu).

use mlvpt::gpu::{GpuContext, FATBINS};
use mlvpt::ops::layernorm::{self, LayerNormShape, Norm, NormStats};

fn main() {
    let (rows, d) = (2usize, 8usize);
    let x: Vec<f32> = (0..rows * d).map(|i| i as f32).collect();
    let (gamma, beta) = (vec![1.0f32; d], vec![0.0f32; d]);
    let (mut y, mut mean, mut rstd) = (vec![0.0f32; rows * d], vec![0.0f32; rows], vec![0.0f32; rows]);
    layernorm::cpu::forward(
        &x,
        Norm { gamma: &gamma[..], beta: &beta[..] },
        &mut y,
        NormStats { mean: &mut mean[..], rstd: &mut rstd[..] },
        &LayerNormShape { rows, dim: d, eps: layernorm::VIT_EPS },
    );
    println!("layernorm (CPU twin): mean {mean:?}, first row {:.3?}", &y[..d]);
    println!("embedded kernel modules: {:?}", FATBINS.iter().map(|(m, _)| *m).collect::<Vec<_>>());
    match GpuContext::new(0) {
        Ok(gpu) => {
            let back = gpu.upload(&y).and_then(|dev| gpu.download(&dev));
            match back {
                Ok(back) => {
                    println!("device {}: round trip {}", gpu.device_name(), if back == y { "exact" } else { "DIFFERS" })
                }
                Err(e) => println!("device {}: {e}", gpu.device_name()),
            }
        }
        Err(e) => println!("no CUDA device here ({e}); the kernels are embedded all the same"),
    }
}
