//! Embedding mlvpt's fused attention in another CUDA Rust program: the caller owns the cudarc
//! context, stream and tensors; mlvpt adopts the stream and runs the fused prompt-masked
//! attention forward and backward on the caller's separate Q, K, V (here stored heads-major,
//! `[B, h, N, dh]`, read through strides, no copies), then checks the results against the CPU
//! twin (`mlvpt::ops::attention::cpu`).
//!
//! `cargo run --release --features cuda --example embed_attention` (a GPU, or the virtual
//! device of tools/vgpu via LD_LIBRARY_PATH; without one it says why and exits non-zero).

use mlvpt::gpu::cudarc::driver::CudaContext;
use mlvpt::gpu::{bf16, GpuContext, Tensor, TensorMut};
use mlvpt::ops::attention::cuda::{self, AttnOptions, Qkv, QkvGrads};
use mlvpt::ops::attention::{cpu, AttnShape};
use rand::{Rng, SeedableRng};

type Error = Box<dyn std::error::Error>;

fn run() -> Result<(), Error> {
    // The caller's own CUDA setup.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let gpu = GpuContext::from_stream(stream.clone())?;
    println!("device: {} (compute capability {:?})", gpu.device_name(), gpu.compute_capability());

    // CLS + 10 prompts + 49 patches, 4 heads of 64; the caller's tensors are [B, h, N, dh].
    let (b, h, n, dh, prompts) = (2usize, 4usize, 60usize, 64usize, 1..11);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut host = |len: usize, scale: f32| -> Vec<bf16> { (0..len).map(|_| bf16::from_f32(rng.random_range(-scale..scale))).collect() };
    let (q_h, k_h, v_h) = (host(b * h * n * dh, 2.0), host(b * h * n * dh, 2.0), host(b * h * n * dh, 2.0));
    let dout_h = host(b * n * h * dh, 1.0);
    let (q, k, v) = (stream.clone_htod(&q_h)?, stream.clone_htod(&k_h)?, stream.clone_htod(&v_h)?);
    let dout = stream.clone_htod(&dout_h)?;

    // [B, N, h, dh] views of [B, h, N, dh] storage: strides (h N dh, dh, N dh, 1).
    let strides = [h * n * dh, dh, n * dh, 1];
    let view = |buf| Tensor::strided(buf, 0, [b, n, h, dh], strides);
    let qkv = Qkv::new(view(&q), view(&k), view(&v));
    let opts = AttnOptions {
        prompts: Some(prompts.clone()),
        queries: None,
    };

    let fwd = cuda::forward(&gpu, &qkv, &opts)?;
    let (mut dq, mut dk, mut dv) = (
        stream.alloc_zeros::<bf16>(q_h.len())?,
        stream.alloc_zeros::<bf16>(q_h.len())?,
        stream.alloc_zeros::<bf16>(q_h.len())?,
    );
    let grads = QkvGrads::Separate {
        dq: TensorMut::strided(&mut dq, 0, [b, n, h, dh], strides),
        dk: TensorMut::strided(&mut dk, 0, [b, n, h, dh], strides),
        dv: TensorMut::strided(&mut dv, 0, [b, n, h, dh], strides),
    };
    cuda::backward(&gpu, &qkv, &fwd.out(), &fwd.lse(), &Tensor::new(&dout, fwd.shape), grads, &opts)?;

    // The CPU twin works on the packed layout [B, N, 3, h, dh], in f32 on the same values.
    let sh = AttnShape::full(b, n, h, dh, prompts.start, prompts.end);
    let d = h * dh;
    let at = |bi: usize, i: usize, j: usize, c: usize| ((bi * h + j) * n + i) * dh + c;
    let mut qkv_f = vec![0f32; b * n * 3 * d];
    for (bi, i, j, c) in itertools(b, n, h, dh) {
        for (slot, src) in [&q_h, &k_h, &v_h].into_iter().enumerate() {
            qkv_f[((bi * n + i) * 3 + slot) * d + j * dh + c] = src[at(bi, i, j, c)].to_f32();
        }
    }
    let (mut out_f, mut lse_f, mut scratch) = (vec![0f32; b * n * d], vec![0f32; b * h * n], Vec::new());
    cpu::forward(&qkv_f, &mut out_f, &mut lse_f, &sh, &mut scratch);
    let dout_f: Vec<f32> = dout_h.iter().map(|x| x.to_f32()).collect();
    let mut dqkv_f = vec![0f32; b * n * 3 * d];
    cpu::backward(&qkv_f, &out_f, &lse_f, &dout_f, &mut dqkv_f, &sh, &mut scratch);

    let out_g: Vec<f32> = stream.clone_dtoh(&fwd.out)?.iter().map(|x| x.to_f32()).collect();
    let mut worst = vec![("out", rel_err(&out_g, &out_f))];
    for (slot, (name, buf)) in [("dq", &dq), ("dk", &dk), ("dv", &dv)].into_iter().enumerate() {
        let got = stream.clone_dtoh(buf)?;
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for (bi, i, j, c) in itertools(b, n, h, dh) {
            g.push(got[at(bi, i, j, c)].to_f32());
            w.push(dqkv_f[((bi * n + i) * 3 + slot) * d + j * dh + c]);
        }
        worst.push((name, rel_err(&g, &w)));
    }
    for (name, e) in &worst {
        println!("{name}: max |gpu - cpu| / max |cpu| = {e:.2e}");
    }
    // bf16 outputs: 2^-8 relative rounding, plus the fp32 sums' order.
    if let Some((name, e)) = worst.iter().find(|(_, e)| *e > 2e-2) {
        return Err(format!("{name} differs from the CPU twin by {e:.2e}").into());
    }
    println!("fused attention forward and backward match the CPU twin");
    Ok(())
}

/// (b, i, j, c) over `[B, N, h, dh]`.
fn itertools(b: usize, n: usize, h: usize, dh: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    (0..b).flat_map(move |bi| (0..n).flat_map(move |i| (0..h).flat_map(move |j| (0..dh).map(move |c| (bi, i, j, c)))))
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(1e-30);
    got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs())) / scale
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
