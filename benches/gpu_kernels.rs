//! Throughput of each CUDA kernel (bytes moved per second; GEMM in flop/s as "elements") at
//! ViT-B/16 training sizes: batch 64 x 227 tokens, D 768, MLP 3072, 1000 labels; the token
//! kernels at batch 128. One module per op, `gpu_kernels/<op>.rs`. Prints a
//! message and exits cleanly when there is no device. Short run (tools/gpu-runner.sh):
//! `cargo bench --features cuda --bench gpu_kernels -- --warm-up-time 0.5 --measurement-time 1`.
//!
//! Each sample queues `iters` launches and waits once, so launch latency is amortised the way
//! a training step sees it.

use criterion::Criterion;
use mlvpt::gpu::{bf16, CudaSlice, GpuContext};

pub(crate) const ROWS: usize = 64 * 227;
pub(crate) const D: usize = 768;
pub(crate) const MLP: usize = 3072;

mod gpu_common;
pub(crate) use gpu_common::timed;
// One module per op. A crate root looks for `benches/<name>.rs`, which cargo would take for
// a bench of its own: hence the paths.
#[path = "gpu_kernels/adamw.rs"]
mod adamw;
#[path = "gpu_kernels/asl.rs"]
mod asl;
#[path = "gpu_kernels/augment.rs"]
mod augment;
#[path = "gpu_kernels/cast.rs"]
mod cast;
#[path = "gpu_kernels/gelu.rs"]
mod gelu;
#[path = "gpu_kernels/layernorm.rs"]
mod layernorm;
#[path = "gpu_kernels/linear.rs"]
mod linear;
#[path = "gpu_kernels/tokens.rs"]
mod tokens;

pub(crate) fn filled<T: cudarc::driver::DeviceRepr + Copy>(gpu: &GpuContext, n: usize, v: T) -> CudaSlice<T> {
    gpu.upload(&vec![v; n]).unwrap()
}

pub(crate) fn ramp_bf16(gpu: &GpuContext, n: usize) -> CudaSlice<bf16> {
    gpu.upload(&(0..n).map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) / 16.0)).collect::<Vec<_>>())
        .unwrap()
}

fn main() {
    let Some(gpu) = gpu_common::open("gpu_kernels") else {
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    for bench in [
        cast::bench,
        adamw::bench,
        layernorm::bench,
        gelu::bench,
        asl::bench,
        linear::bench,
        tokens::bench,
        augment::bench,
    ] {
        bench(&mut c, &gpu);
    }
    c.final_summary();
}
