//! Shared by the whole-step tests of the CUDA backend's precisions (tests/gpu_backend.rs: on a
//! device, and the bf16-storage checks that run on the CPU): [`Bf16Emu`], the CUDA backend's bf16
//! roundings emulated on the CPU, and [`step_metrics`], how far a backend's training step is
//! from `CpuBackend<f32>`'s.
//!
//! [`Bf16Emu`] wraps `CpuBackend<f32>`. With `storage` (as [`Precision::Bf16`]) every buffer
//! allocated as [`BufRole::Frozen`] or [`BufRole::Activation`] holds bf16 values (rounded after
//! every write, as the GPU's bf16 buffers do); in both modes the fp32 operands that the GPU's
//! bf16-only kernels read through a cast (LayerNorm's output gradient, a GEMM's fp32
//! gradient operand, the adapter backward's inputs) are rounded, and so is LayerNorm's output,
//! which its kernels always write in bf16 (without `storage`, as [`Precision::F32`]). It leaves out the kernels' internal roundings (e.g. the fused
//! attention's bf16 probabilities), so it under-estimates the GPU's error, by a small factor.
//!
//! [`Precision::Bf16`]: mlvpt::backend::Precision::Bf16
//! [`Precision::F32`]: mlvpt::backend::Precision::F32
#![allow(dead_code)]

use crate::common_model::{images_targets, lively_backbone, tables};
use half::bf16;
use mlvpt::backend::cpu::HostStaging;
use mlvpt::backend::{
    AdamWConfig, AdapterParams, AdapterShape, AslConfig, AttnShape, AugmentShape, Backend, BranchLogits, BranchParams, BufRole, CpuBackend,
    Crop, GateTables, Grad, HeadInputs, LayerNormShape, LinearShape, MoeSaved, MoeShape, Norm, NormStats, PatchShape, Residual, Rows,
    TokenCopy, TokenShape, VptHeadShape, VptParams,
};
use mlvpt::model::{ModelConfig, Params};
use mlvpt::train::Trainer;

/// A buffer of [`Bf16Emu`] and whether it is stored in bf16.
pub struct Buf {
    v: Vec<f32>,
    bf16: bool,
}

impl Buf {
    /// What a bf16 buffer holds after a write.
    fn round(&mut self) {
        if self.bf16 {
            round_all(&mut self.v);
        }
    }
}

fn round_all(v: &mut [f32]) {
    for x in v {
        *x = bf16::from_f32(*x).to_f32();
    }
}

/// `CpuBackend<f32>` with the CUDA backend's bf16 roundings (see the module docs).
pub struct Bf16Emu {
    inner: CpuBackend<f32>,
    storage: bool,
}

impl Bf16Emu {
    /// As the CUDA backend in [`mlvpt::backend::Precision::Bf16`].
    pub fn bf16_storage() -> Self {
        Self {
            inner: CpuBackend::new(),
            storage: true,
        }
    }
    /// As the CUDA backend in [`mlvpt::backend::Precision::F32`]: the kernels' casts only.
    pub fn casts_only() -> Self {
        Self {
            inner: CpuBackend::new(),
            storage: false,
        }
    }
    /// An operand as a bf16-only kernel reads it.
    fn cast(&self, v: &[f32]) -> Vec<f32> {
        let mut c = v.to_vec();
        round_all(&mut c);
        c
    }
}

impl Backend for Bf16Emu {
    type Buf = Buf;
    type Idx = Vec<u32>;
    type Staging = HostStaging;

    fn name(&self) -> String {
        format!(
            "cpu-f32 emulating {}",
            if self.storage { "bf16 storage" } else { "bf16 kernel casts" }
        )
    }
    fn alloc(&mut self, len: usize) -> Buf {
        self.alloc_as(len, BufRole::State)
    }
    fn alloc_as(&mut self, len: usize, role: BufRole) -> Buf {
        Buf {
            v: self.inner.alloc(len),
            bf16: self.storage && role != BufRole::State,
        }
    }
    fn buf_len(&self, buf: &Buf) -> usize {
        buf.v.len()
    }
    fn upload(&mut self, src: &[f32], dst: &mut Buf) {
        self.inner.upload(src, &mut dst.v);
        dst.round();
    }
    fn upload_f64(&mut self, src: &[f64], dst: &mut Buf) {
        self.inner.upload_f64(src, &mut dst.v);
        dst.round();
    }
    fn download(&self, src: &Buf, dst: &mut [f32]) {
        self.inner.download(&src.v, dst)
    }
    fn download_f64(&self, src: &Buf, dst: &mut [f64]) {
        self.inner.download_f64(&src.v, dst)
    }
    fn upload_idx(&mut self, src: &[u32]) -> Vec<u32> {
        self.inner.upload_idx(src)
    }
    fn alloc_staging(&mut self) -> HostStaging {
        self.inner.alloc_staging()
    }
    fn stage(&mut self, staging: &mut HostStaging, pixels: &[u8], crops: &[Crop]) {
        self.inner.stage(staging, pixels, crops)
    }
    fn augment(&mut self, staging: &HostStaging, out: &mut Buf, shape: &AugmentShape) {
        self.inner.augment(staging, &mut out.v, shape);
        out.round();
    }
    fn fill(&mut self, buf: &mut Buf, len: usize, value: f64) {
        self.inner.fill(&mut buf.v, len, value);
        buf.round();
    }
    fn copy(&mut self, src: &Buf, dst: &mut Buf, len: usize) {
        self.inner.copy(&src.v, &mut dst.v, len);
        dst.round();
    }
    fn axpby(&mut self, a: f64, y: &mut Buf, b: f64, x: &Buf, len: usize) {
        self.inner.axpby(a, &mut y.v, b, &x.v, len);
        y.round();
    }
    fn patchify(&mut self, images: &Buf, out: &mut Buf, shape: &PatchShape) {
        self.inner.patchify(&images.v, &mut out.v, shape);
        out.round();
    }
    fn embed_tokens(&mut self, patches: &Buf, cls: &Buf, pos: &Buf, x: &mut Buf, shape: &TokenShape) {
        self.inner.embed_tokens(&patches.v, &cls.v, &pos.v, &mut x.v, shape);
        x.round();
    }
    fn set_prompts(&mut self, prompts: &Buf, layer: usize, x: &mut Buf, shape: &TokenShape) {
        self.inner.set_prompts(&prompts.v, layer, &mut x.v, shape);
        x.round();
    }
    fn prompt_grad(&mut self, dx: &mut Buf, dprompts: &mut Buf, layer: usize, shape: &TokenShape, zero_rows: bool) {
        self.inner.prompt_grad(&mut dx.v, &mut dprompts.v, layer, shape, zero_rows);
        dx.round();
        dprompts.round();
    }
    fn copy_tokens(&mut self, src: &Buf, dst: &mut Buf, copy: &TokenCopy) {
        self.inner.copy_tokens(&src.v, &mut dst.v, copy);
        dst.round();
    }
    fn residual(&mut self, res: Residual<'_, Buf>, out: &mut Buf, shape: Rows) {
        let res = Residual {
            x: &res.x.v,
            f: &res.f.v,
            ls: res.ls.map(|b| &b.v),
        };
        self.inner.residual(res, &mut out.v, shape);
        out.round();
    }
    fn mul_cols(&mut self, src: &Buf, v: &Buf, out: &mut Buf, shape: Rows) {
        self.inner.mul_cols(&src.v, &v.v, &mut out.v, shape);
        out.round();
    }
    fn linear_forward(&mut self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &mut Buf, shape: &LinearShape) {
        self.inner.linear_forward(&x.v, &w.v, bias.map(|b| &b.v), &mut y.v, shape);
        y.round();
    }
    fn linear_backward_input(&mut self, dy: &Buf, w: &Buf, dx: Grad<&mut Buf>, shape: &LinearShape) {
        let dy = self.cast(&dy.v);
        let add = dx.accumulates();
        let dx = dx.into_inner();
        self.inner.linear_backward_input(&dy, &w.v, Grad::new(add, &mut dx.v), shape);
        dx.round();
    }
    fn layernorm_forward(&mut self, x: &Buf, norm: Norm<&Buf>, y: &mut Buf, stats: NormStats<&mut Buf>, shape: &LayerNormShape) {
        // The kernels read x in its own storage and always write y in bf16.
        self.inner
            .layernorm_forward(&x.v, norm.map(|b| &b.v), &mut y.v, stats.map(|b| &mut b.v), shape);
        round_all(&mut y.v);
    }
    fn layernorm_backward(
        &mut self,
        dy: &Buf,
        x: &Buf,
        norm: Norm<&Buf>,
        stats: NormStats<&Buf>,
        dx: Grad<&mut Buf>,
        shape: &LayerNormShape,
    ) {
        // dy is read in bf16; x is read in dx's storage, and dx written in it.
        let add = dx.accumulates();
        let dx = dx.into_inner();
        let dy = self.cast(&dy.v);
        let x = if dx.bf16 { self.cast(&x.v) } else { x.v.clone() };
        self.inner
            .layernorm_backward(&dy, &x, norm.map(|b| &b.v), stats.map(|b| &b.v), Grad::new(add, &mut dx.v), shape);
        dx.round();
    }
    fn gelu_forward(&mut self, x: &Buf, bias: Option<&Buf>, y: &mut Buf, shape: Rows) {
        self.inner.gelu_forward(&x.v, bias.map(|b| &b.v), &mut y.v, shape);
        y.round();
    }
    fn gelu_backward(&mut self, x: &Buf, bias: Option<&Buf>, d: &mut Buf, shape: Rows) {
        self.inner.gelu_backward(&x.v, bias.map(|b| &b.v), &mut d.v, shape);
        d.round();
    }
    fn attention_forward(&mut self, qkv: &Buf, out: &mut Buf, lse: &mut Buf, shape: &AttnShape) {
        self.inner.attention_forward(&qkv.v, &mut out.v, &mut lse.v, shape);
        out.round();
        lse.round();
    }
    fn attention_backward(&mut self, qkv: &Buf, out: &Buf, lse: &Buf, dout: &Buf, dqkv: &mut Buf, shape: &AttnShape) {
        self.inner.attention_backward(&qkv.v, &out.v, &lse.v, &dout.v, &mut dqkv.v, shape);
        dqkv.round();
    }
    fn adapter_forward(&mut self, z: &Buf, params: AdapterParams<&Buf>, u: &mut Buf, out: &mut Buf, shape: &AdapterShape) {
        self.inner.adapter_forward(&z.v, params.map(|b| &b.v), &mut u.v, &mut out.v, shape);
        u.round();
        out.round();
    }
    fn adapter_backward(
        &mut self,
        dout: &Buf,
        z: &Buf,
        u: &Buf,
        params: AdapterParams<&Buf>,
        dz: &mut Buf,
        grads: AdapterParams<&mut Buf>,
        shape: &AdapterShape,
    ) {
        let dout = self.cast(&dout.v);
        let z = self.cast(&z.v);
        let mut grads = grads;
        self.inner.adapter_backward(
            &dout,
            &z,
            &u.v,
            params.map(|b| &b.v),
            &mut dz.v,
            grads.as_mut().map(|b| &mut b.v),
            shape,
        );
        dz.round();
        grads.map(Buf::round);
    }
    fn moe_forward(
        &mut self,
        inputs: HeadInputs<&Buf>,
        params: BranchParams<&Buf>,
        tables: &GateTables<Vec<u32>>,
        logits: BranchLogits<&mut Buf>,
        saved: MoeSaved<&mut Buf>,
        shape: &MoeShape,
    ) {
        let (mut logits, mut saved) = (logits, saved);
        self.inner.moe_forward(
            inputs.map(|b| &b.v),
            params.map(|b| &b.v),
            tables,
            logits.as_mut().map(|b| &mut b.v),
            saved.as_mut().map(|b| &mut b.v),
            shape,
        );
        logits.map(Buf::round);
        saved.map(Buf::round);
    }
    fn moe_backward(
        &mut self,
        dlogits: BranchLogits<&Buf>,
        inputs: HeadInputs<&Buf>,
        params: BranchParams<&Buf>,
        tables: &GateTables<Vec<u32>>,
        saved: MoeSaved<&Buf>,
        dinputs: HeadInputs<&mut Buf>,
        grads: BranchParams<&mut Buf>,
        shape: &MoeShape,
    ) {
        let (mut dinputs, mut grads) = (dinputs, grads);
        self.inner.moe_backward(
            dlogits.map(|b| &b.v),
            inputs.map(|b| &b.v),
            params.map(|b| &b.v),
            tables,
            saved.map(|b| &b.v),
            dinputs.as_mut().map(|b| &mut b.v),
            grads.as_mut().map(|b| &mut b.v),
            shape,
        );
        dinputs.map(Buf::round);
        grads.map(Buf::round);
    }
    fn vpt_head_forward(&mut self, z: &Buf, params: VptParams<&Buf>, zbar: &mut Buf, y: &mut Buf, shape: &VptHeadShape) {
        self.inner
            .vpt_head_forward(&z.v, params.map(|b| &b.v), &mut zbar.v, &mut y.v, shape);
        zbar.round();
        y.round();
    }
    fn vpt_head_backward(
        &mut self,
        dy: &Buf,
        zbar: &Buf,
        params: VptParams<&Buf>,
        dz: &mut Buf,
        grads: VptParams<&mut Buf>,
        shape: &VptHeadShape,
    ) {
        let mut grads = grads;
        self.inner.vpt_head_backward(
            &dy.v,
            &zbar.v,
            params.map(|b| &b.v),
            &mut dz.v,
            grads.as_mut().map(|b| &mut b.v),
            shape,
        );
        dz.round();
        grads.map(Buf::round);
    }
    fn asl(&mut self, logits: &Buf, targets: &Buf, len: usize, cfg: &AslConfig, scale: f64, mut grad: Option<&mut Buf>) -> f64 {
        let r = self
            .inner
            .asl(&logits.v, &targets.v, len, cfg, scale, grad.as_deref_mut().map(|b| &mut b.v));
        if let Some(b) = grad {
            b.round();
        }
        r
    }

    fn adamw(
        &mut self,
        params: &mut [Buf],
        grads: &[Buf],
        m: &mut [Buf],
        v: &mut [Buf],
        step: u64,
        lr: f64,
        cfg: &AdamWConfig,
        guard: Option<&Buf>,
    ) {
        let take = |b: &mut [Buf]| -> Vec<Vec<f32>> { b.iter_mut().map(|x| std::mem::take(&mut x.v)).collect() };
        let (mut p, mut mm, mut vv) = (take(params), take(m), take(v));
        let g: Vec<Vec<f32>> = grads.iter().map(|x| x.v.clone()).collect();
        self.inner.adamw(&mut p, &g, &mut mm, &mut vv, step, lr, cfg, guard.map(|b| &b.v));
        for (bufs, vals) in [(params, p), (m, mm), (v, vv)] {
            for (b, x) in bufs.iter_mut().zip(vals) {
                b.v = x;
                b.round();
            }
        }
    }
}

/// A trainer on `be` with the lively test backbone and `max_batch` images.
pub fn trainer_on<B: Backend>(be: B, cfg: &ModelConfig, branches: usize, max_batch: usize, seed: u64) -> Trainer<B> {
    let bb = lively_backbone(&cfg.vit, seed);
    let params = Params::init(cfg, branches, seed + 1);
    Trainer::new(
        be,
        cfg.clone(),
        &bb,
        params,
        tables(cfg.labels, cfg.groups, branches),
        AslConfig::default(),
        AdamWConfig::default(),
        max_batch,
    )
    .unwrap()
}

/// Relative L2 distance `|a - b| / max(|b|, floor)`.
pub fn rel(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if d.is_nan() {
        return f64::INFINITY;
    }
    d / n.max(floor)
}

/// How far a backend's training step is from `CpuBackend<f32>`'s, each a relative distance:
/// logits (L2), the loss, every gradient tensor (L2), the loss of three AdamW steps, and each
/// parameter tensor after them (distance between the runs over the CPU run's movement).
#[derive(Debug)]
pub struct StepMetrics {
    pub logits: f64,
    pub loss: f64,
    pub grads: Vec<(String, f64)>,
    pub step_losses: Vec<f64>,
    pub params_apart: Vec<(String, f64)>,
}

/// [`StepMetrics`] of `be` on `batch` images of `cfg` (seeded, the same for every backend).
pub fn step_metrics<B: Backend>(be: B, cfg: &ModelConfig, branches: usize, batch: usize) -> StepMetrics {
    let seed = 11;
    let mut cpu = trainer_on(CpuBackend::<f32>::new(), cfg, branches, batch, seed);
    let mut other = trainer_on(be, cfg, branches, batch, seed);
    let (images, targets) = images_targets(cfg, batch, seed + 2);
    let logits = rel(&other.predict(&images).unwrap(), &cpu.predict(&images).unwrap(), 1e-3);
    let (loss_c, gc) = cpu.loss_and_grads(&images, &targets).unwrap();
    let (loss_o, go) = other.loss_and_grads(&images, &targets).unwrap();
    let loss = ((loss_c - loss_o).abs() / loss_c.abs().max(1e-3)) as f64;
    let grads = gc
        .tensors
        .iter()
        .zip(&go.tensors)
        .map(|(c, o)| (c.name.clone(), rel(&o.data, &c.data, 1e-6)))
        .collect();
    let p0 = cpu.params();
    let step_losses = (0..3)
        .map(|_| {
            let (a, b) = (
                cpu.step(&images, &targets, 1e-3).unwrap(),
                other.step(&images, &targets, 1e-3).unwrap(),
            );
            ((a - b).abs() / a.abs().max(1e-3)) as f64
        })
        .collect();
    let (pc, po) = (cpu.params(), other.params());
    let params_apart = pc
        .tensors
        .iter()
        .zip(&po.tensors)
        .zip(&p0.tensors)
        .map(|((c, o), z)| {
            let moved: Vec<f32> = c.data.iter().zip(&z.data).map(|(a, b)| a - b).collect();
            let apart: Vec<f32> = c.data.iter().zip(&o.data).map(|(a, b)| a - b).collect();
            let zero = vec![0.0; moved.len()];
            (c.name.clone(), rel(&apart, &zero, 1.0) / rel(&moved, &zero, 1.0).max(1e-12))
        })
        .collect();
    StepMetrics {
        logits,
        loss,
        grads,
        step_losses,
        params_apart,
    }
}
