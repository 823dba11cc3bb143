//! The CPU reference backend: host vectors, the ops of `crate::ops::*::cpu`, generic over the
//! float type (`CpuBackend<f32>` trains, `CpuBackend<f64>` runs the gradient checks).
//!
//! With the `fast-cpu` feature every op is a fork-join on rayon's global pool. A program that
//! drives the backend from a thread outside the pool pays two thread wake-ups per op (the
//! pool's, then its own); the `mlvpt` binary makes its main thread worker 0 of the pool instead
//! (`rayon::ThreadPoolBuilder::new().use_current_thread().build_global()`, before any other
//! rayon call), which an embedding program can do the same way.

use super::{
    AdamWConfig, AdapterParams, AdapterShape, AslConfig, AttnShape, AugmentShape, Backend, BranchLogits, BranchParams, Crop, GateTables,
    Grad, HeadInputs, LayerNormShape, LinearShape, MoeSaved, MoeShape, Norm, NormStats, PatchShape, Residual, Rows, TokenCopy, TokenShape,
    VptHeadShape, VptParams,
};
use crate::ops::real::{cast, Real};
use crate::ops::{adamw, attention, augment, gelu, head, layernorm, linear, tokens};

/// CPU backend over `Vec<T>` buffers. Holds a scratch vector that grows to the largest size
/// an op needs and is then reused (no allocation per step once shapes are fixed).
#[derive(Debug, Default)]
pub struct CpuBackend<T: Real = f32> {
    scratch: Vec<T>,
}

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        Self { scratch: Vec::new() }
    }
}

/// The CPU backend's [`Backend::Staging`]: the batch's bytes and crop table, copied.
#[derive(Debug, Default)]
pub struct HostStaging {
    pixels: Vec<u8>,
    crops: Vec<Crop>,
}

impl<T: Real> Backend for CpuBackend<T> {
    type Buf = Vec<T>;
    type Idx = Vec<u32>;
    type Staging = HostStaging;

    fn name(&self) -> String {
        format!("cpu-{}", std::any::type_name::<T>())
    }

    fn alloc(&mut self, len: usize) -> Vec<T> {
        vec![T::zero(); len]
    }
    fn buf_len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn upload(&mut self, src: &[f32], dst: &mut Vec<T>) {
        for (d, &s) in dst[..src.len()].iter_mut().zip(src) {
            *d = cast(s as f64);
        }
    }
    fn upload_f64(&mut self, src: &[f64], dst: &mut Vec<T>) {
        for (d, &s) in dst[..src.len()].iter_mut().zip(src) {
            *d = cast(s);
        }
    }
    fn download(&self, src: &Vec<T>, dst: &mut [f32]) {
        let n = dst.len();
        for (d, s) in dst.iter_mut().zip(&src[..n]) {
            *d = s.to_f32().unwrap_or(f32::NAN);
        }
    }
    fn download_f64(&self, src: &Vec<T>, dst: &mut [f64]) {
        let n = dst.len();
        for (d, s) in dst.iter_mut().zip(&src[..n]) {
            *d = s.to_f64().unwrap_or(f64::NAN);
        }
    }
    fn alloc_staging(&mut self) -> HostStaging {
        HostStaging::default()
    }
    fn stage(&mut self, staging: &mut HostStaging, pixels: &[u8], crops: &[Crop]) {
        staging.pixels.clear();
        staging.pixels.extend_from_slice(pixels);
        staging.crops.clear();
        staging.crops.extend_from_slice(crops);
    }
    fn augment(&mut self, staging: &HostStaging, out: &mut Vec<T>, shape: &AugmentShape) {
        augment::cpu::augment(&staging.pixels, &staging.crops, out, shape);
    }
    fn upload_idx(&mut self, src: &[u32]) -> Vec<u32> {
        src.to_vec()
    }
    fn fill(&mut self, buf: &mut Vec<T>, len: usize, value: f64) {
        buf[..len].fill(cast(value));
    }
    fn copy(&mut self, src: &Vec<T>, dst: &mut Vec<T>, len: usize) {
        dst[..len].copy_from_slice(&src[..len]);
    }
    fn axpby(&mut self, a: f64, y: &mut Vec<T>, b: f64, x: &Vec<T>, len: usize) {
        let (a, b): (T, T) = (cast(a), cast(b));
        for (o, &v) in y[..len].iter_mut().zip(&x[..len]) {
            *o = a * *o + b * v;
        }
    }

    fn patchify(&mut self, images: &Vec<T>, out: &mut Vec<T>, sh: &PatchShape) {
        tokens::cpu::patchify(images, out, sh);
    }
    fn embed_tokens(&mut self, patches: &Vec<T>, cls: &Vec<T>, pos: &Vec<T>, x: &mut Vec<T>, sh: &TokenShape) {
        tokens::cpu::embed_tokens(patches, cls, pos, x, sh);
    }
    fn set_prompts(&mut self, prompts: &Vec<T>, layer: usize, x: &mut Vec<T>, sh: &TokenShape) {
        tokens::cpu::set_prompts(prompts, layer, x, sh);
    }
    fn prompt_grad(&mut self, dx: &mut Vec<T>, dprompts: &mut Vec<T>, layer: usize, sh: &TokenShape, zero_rows: bool) {
        tokens::cpu::prompt_grad(dx, dprompts, layer, sh, zero_rows);
    }
    fn copy_tokens(&mut self, src: &Vec<T>, dst: &mut Vec<T>, c: &TokenCopy) {
        tokens::cpu::copy_tokens(src, dst, c);
    }
    fn residual(&mut self, res: Residual<'_, Vec<T>>, out: &mut Vec<T>, sh: Rows) {
        tokens::cpu::residual(res.x, res.f, res.ls.map(|l| l.as_slice()), out, sh);
    }
    fn mul_cols(&mut self, src: &Vec<T>, v: &Vec<T>, out: &mut Vec<T>, sh: Rows) {
        tokens::cpu::mul_cols(src, v, out, sh);
    }

    fn linear_forward(&mut self, x: &Vec<T>, w: &Vec<T>, bias: Option<&Vec<T>>, y: &mut Vec<T>, sh: &LinearShape) {
        linear::cpu::forward(x, w, bias.map(|b| b.as_slice()), y, sh);
    }
    fn linear_backward_input(&mut self, dy: &Vec<T>, w: &Vec<T>, dx: Grad<&mut Vec<T>>, sh: &LinearShape) {
        linear::cpu::backward_input(dy, w, dx.map(|v| v.as_mut_slice()), sh);
    }
    fn layernorm_forward(&mut self, x: &Vec<T>, norm: Norm<&Vec<T>>, y: &mut Vec<T>, stats: NormStats<&mut Vec<T>>, sh: &LayerNormShape) {
        layernorm::cpu::forward(x, norm.map(|v| v.as_slice()), y, stats.map(|v| v.as_mut_slice()), sh);
    }
    fn layernorm_backward(
        &mut self,
        dy: &Vec<T>,
        x: &Vec<T>,
        norm: Norm<&Vec<T>>,
        stats: NormStats<&Vec<T>>,
        dx: Grad<&mut Vec<T>>,
        sh: &LayerNormShape,
    ) {
        layernorm::cpu::backward(dy, x, norm.gamma, stats.map(|v| v.as_slice()), dx.map(|v| v.as_mut_slice()), sh);
    }
    fn gelu_forward(&mut self, x: &Vec<T>, bias: Option<&Vec<T>>, y: &mut Vec<T>, shape: Rows) {
        gelu::cpu::forward(x, bias.map(|b| &b[..]), y, shape);
    }
    fn gelu_backward(&mut self, x: &Vec<T>, bias: Option<&Vec<T>>, d: &mut Vec<T>, shape: Rows) {
        gelu::cpu::backward(x, bias.map(|b| &b[..]), d, shape);
    }
    fn attention_forward(&mut self, qkv: &Vec<T>, out: &mut Vec<T>, lse: &mut Vec<T>, shape: &AttnShape) {
        attention::cpu::forward(qkv, out, lse, shape, &mut self.scratch);
    }
    fn attention_backward(&mut self, qkv: &Vec<T>, out: &Vec<T>, lse: &Vec<T>, dout: &Vec<T>, dqkv: &mut Vec<T>, shape: &AttnShape) {
        attention::cpu::backward(qkv, out, lse, dout, dqkv, shape, &mut self.scratch);
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_keys(
        &mut self,
        qkv: &Vec<T>,
        out: &Vec<T>,
        lse: &Vec<T>,
        dout: &Vec<T>,
        dqkv: &mut Vec<T>,
        shape: &AttnShape,
        keys: std::ops::Range<usize>,
    ) {
        attention::cpu::backward_keys(qkv, out, lse, dout, dqkv, shape, keys, &mut self.scratch);
    }
    fn adapter_forward(&mut self, z: &Vec<T>, p: AdapterParams<&Vec<T>>, u: &mut Vec<T>, out: &mut Vec<T>, shape: &AdapterShape) {
        head::cpu::adapter_forward(z, p.w1, p.b1, p.w2, p.b2, u, out, shape, &mut self.scratch);
    }
    fn adapter_backward(
        &mut self,
        dout: &Vec<T>,
        z: &Vec<T>,
        u: &Vec<T>,
        p: AdapterParams<&Vec<T>>,
        dz: &mut Vec<T>,
        g: AdapterParams<&mut Vec<T>>,
        shape: &AdapterShape,
    ) {
        head::cpu::adapter_backward(dout, z, u, p.w1, p.w2, dz, g.w1, g.b1, g.w2, g.b2, shape, &mut self.scratch);
    }
    fn moe_forward(
        &mut self,
        i: HeadInputs<&Vec<T>>,
        p: BranchParams<&Vec<T>>,
        t: &GateTables<Vec<u32>>,
        l: BranchLogits<&mut Vec<T>>,
        s: MoeSaved<&mut Vec<T>>,
        shape: &MoeShape,
    ) {
        head::cpu::moe_forward(i.z, i.adapted, p.gate, p.w, p.c, &t.token, &t.gate_row, l.y, l.m, s.q, s.r, shape);
    }
    fn moe_backward(
        &mut self,
        dl: BranchLogits<&Vec<T>>,
        i: HeadInputs<&Vec<T>>,
        p: BranchParams<&Vec<T>>,
        t: &GateTables<Vec<u32>>,
        s: MoeSaved<&Vec<T>>,
        di: HeadInputs<&mut Vec<T>>,
        g: BranchParams<&mut Vec<T>>,
        shape: &MoeShape,
    ) {
        head::cpu::moe_backward(
            dl.y,
            dl.m,
            i.z,
            i.adapted,
            p.gate,
            p.w,
            &t.token,
            &t.gate_row,
            s.q,
            s.r,
            di.z,
            di.adapted,
            g.gate,
            g.w,
            g.c,
            shape,
            &mut self.scratch,
        );
    }
    fn vpt_head_forward(&mut self, z: &Vec<T>, p: VptParams<&Vec<T>>, zbar: &mut Vec<T>, y: &mut Vec<T>, shape: &VptHeadShape) {
        head::cpu::vpt_forward(z, p.w, p.c, zbar, y, shape);
    }
    fn vpt_head_backward(
        &mut self,
        dy: &Vec<T>,
        zbar: &Vec<T>,
        p: VptParams<&Vec<T>>,
        dz: &mut Vec<T>,
        g: VptParams<&mut Vec<T>>,
        shape: &VptHeadShape,
    ) {
        head::cpu::vpt_backward(dy, zbar, p.w, dz, g.w, g.c, shape, &mut self.scratch);
    }
    fn asl(&mut self, logits: &Vec<T>, targets: &Vec<T>, len: usize, cfg: &AslConfig, scale: f64, grad: Option<&mut Vec<T>>) -> f64 {
        let s: T = cast(scale);
        let loss = match grad {
            Some(g) => {
                let l = crate::ops::asl::asl_forward_backward(&logits[..len], &targets[..len], cfg, Some(&mut g[..len]));
                for v in g[..len].iter_mut() {
                    *v = *v * s;
                }
                l
            }
            None => crate::ops::asl::asl_forward_backward(&logits[..len], &targets[..len], cfg, None),
        };
        loss.to_f64().unwrap_or(f64::NAN) * scale
    }
    fn adamw(
        &mut self,
        params: &mut [Vec<T>],
        grads: &[Vec<T>],
        m: &mut [Vec<T>],
        v: &mut [Vec<T>],
        step: u64,
        lr: f64,
        cfg: &AdamWConfig,
        guard: Option<&Vec<T>>,
    ) {
        assert!(grads.len() == params.len() && m.len() == params.len() && v.len() == params.len());
        if guard.is_some_and(|g| !g[0].is_finite()) {
            return;
        }
        for i in 0..params.len() {
            adamw::cpu::step(&mut params[i], &grads[i], &mut m[i], &mut v[i], step, lr, cfg);
        }
    }
}
