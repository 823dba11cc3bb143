//! Embedding mlvpt's label-gated mixture-of-experts head and the asymmetric loss in another
//! CUDA Rust program: upload a batch of prompt-token features, run the head forward, the loss
//! and the head backward each in one call on typed views, and check every result against the
//! CPU twins (`mlvpt::ops::head::cpu`, `mlvpt::ops::asl`).
//!
//! `cargo run --release --features cuda --example embed_head` (a GPU, or the virtual device of
//! tools/vgpu via LD_LIBRARY_PATH; without one it says why and exits non-zero).

use mlvpt::gpu::{bf16, GpuContext, Tensor, TensorMut};
use mlvpt::ops::asl::{asl_forward_backward, cuda as asl_cuda, AslConfig};
use mlvpt::ops::head::cuda::{gated_backward, gated_forward, GatedHead, IndexTable};
use mlvpt::ops::head::{cpu, MoeShape};
use rand::{Rng, SeedableRng};

type Error = Box<dyn std::error::Error>;

fn run() -> Result<(), Error> {
    let gpu = GpuContext::new(0)?;
    println!("device: {}", gpu.device_name());
    // 6 images, 5 prompt tokens of 96 features, 7 labels with 3 experts each, label gating.
    let (b, p, d, k, e) = (6usize, 5usize, 96usize, 7usize, 3usize);
    let s = MoeShape {
        batch: b,
        tokens: p,
        dim: d,
        labels: k,
        experts: e,
        gate_rows: e * k,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut noise = |len: usize, scale: f32| -> Vec<f32> { (0..len).map(|_| rng.random_range(-scale..scale)).collect() };
    // bf16 activations: round once, so the CPU sees exactly what the GPU sees.
    let round = |v: Vec<f32>| -> (Vec<bf16>, Vec<f32>) {
        let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let f = h.iter().map(|x| x.to_f32()).collect();
        (h, f)
    };
    let (z_h, z_f) = round(noise(b * p * d, 1.0));
    let (a_h, a_f) = round(noise(b * p * d, 1.0));
    let (gate_f, w_f, c_f) = (noise(e * k * d, 0.1), noise(k * d, 0.1), noise(k, 0.5));
    // Expert e of label k: token (k + e) % P, gate row e*K + k.
    let tok: Vec<u32> = (0..e * k).map(|i| ((i % k + i / k) % p) as u32).collect();
    let grow: Vec<u32> = (0..(e * k) as u32).collect();
    let targets_f: Vec<f32> = (0..b * k).map(|i| ((i * 7) % 3 == 0) as u32 as f32).collect();

    let (z, a) = (gpu.upload(&z_h)?, gpu.upload(&a_h)?);
    let (gate, w, c) = (gpu.upload(&gate_f)?, gpu.upload(&w_f)?, gpu.upload(&c_f)?);
    let (tok_d, grow_d) = (IndexTable::new(&gpu, &tok, p)?, IndexTable::new(&gpu, &grow, e * k)?);
    let head = GatedHead {
        gate: Tensor::new(&gate, [e * k, d]),
        w: Tensor::new(&w, [k, d]),
        c: Tensor::new(&c, [k]),
        tok: &tok_d,
        grow: &grow_d,
        experts: e,
    };
    let (zv, av) = (Tensor::new(&z, [b, p, d]), Tensor::new(&a, [b, p, d]));

    // Forward, the loss of y against the targets (mean over B K), backward with dm = 0.
    let fwd = gated_forward(&gpu, &head, &zv, &av)?;
    let targets = gpu.upload(&targets_f)?;
    let cfg = AslConfig::default();
    let scale = 1.0 / (b * k) as f32;
    let loss = asl_cuda::loss(&gpu, &Tensor::new(&fwd.y, [b, k]), &Tensor::new(&targets, [b, k]), &cfg, scale)?;
    let dm = gpu.zeros::<f32>(b * k)?;
    let (mut dz, mut da) = (gpu.zeros::<bf16>(b * p * d)?, gpu.zeros::<bf16>(b * p * d)?);
    let grads = gated_backward(
        &gpu,
        &head,
        &zv,
        &av,
        &fwd,
        &Tensor::new(&loss.grad, [b, k]),
        &Tensor::new(&dm, [b, k]),
        &mut TensorMut::new(&mut dz, [b, p, d]),
        &mut TensorMut::new(&mut da, [b, p, d]),
    )?;

    // The CPU twins on the same values.
    let (mut y, mut m, mut q, mut r) = (vec![0f32; b * k], vec![0f32; b * k], vec![0f32; b * e * k], vec![0f32; b * e * k]);
    cpu::moe_forward(&z_f, &a_f, &gate_f, &w_f, &c_f, &tok, &grow, &mut y, &mut m, &mut q, &mut r, &s);
    let mut dy = vec![0f32; b * k];
    let loss_cpu = asl_forward_backward(&y, &targets_f, &cfg, Some(&mut dy)) * scale;
    dy.iter_mut().for_each(|g| *g *= scale);
    let (mut dz_c, mut da_c) = (vec![0f32; b * p * d], vec![0f32; b * p * d]);
    let (mut dgate_c, mut dw_c, mut dc_c) = (vec![0f32; e * k * d], vec![0f32; k * d], vec![0f32; k]);
    let zeros = vec![0f32; b * k];
    cpu::moe_backward(
        &dy,
        &zeros,
        &z_f,
        &a_f,
        &gate_f,
        &w_f,
        &tok,
        &grow,
        &q,
        &r,
        &mut dz_c,
        &mut da_c,
        &mut dgate_c,
        &mut dw_c,
        &mut dc_c,
        &s,
        &mut Vec::new(),
    );

    let f32s = |x: &Vec<bf16>| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
    let checks = [
        ("y", gpu.download(&fwd.y)?, y),
        ("m", gpu.download(&fwd.m)?, m),
        ("loss", gpu.download(&loss.loss)?, vec![loss_cpu]),
        ("dgate", gpu.download(&grads.dgate)?, dgate_c),
        ("dw", gpu.download(&grads.dw)?, dw_c),
        ("dc", gpu.download(&grads.dc)?, dc_c),
        ("dz", f32s(&gpu.download(&dz)?), dz_c),
        ("dadapted", f32s(&gpu.download(&da)?), da_c),
    ];
    let mut bad = Vec::new();
    for (name, got, want) in &checks {
        let scale = want.iter().fold(0f64, |mx, &x| mx.max(x.abs() as f64)).max(1e-30);
        let err = got.iter().zip(want).fold(0f64, |mx, (&g, &w)| mx.max((g as f64 - w as f64).abs())) / scale;
        println!("{name:>8}: max |gpu - cpu| / max |cpu| = {err:.2e}");
        // fp32 results (tensor-core products of bf16 pairs: ~2^-16 of a sum) and bf16 token gradients.
        if err > 1e-2 {
            bad.push(*name);
        }
    }
    if !bad.is_empty() {
        return Err(format!("{bad:?} differ from the CPU twins").into());
    }
    println!("gated head forward, ASL and head backward match the CPU twins");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
