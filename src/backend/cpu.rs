//! The CPU reference backend: host vectors, the ops of `crate::ops::*::cpu`, generic over the
//! float type (`CpuBackend<f32>` trains, `CpuBackend<f64>` runs the gradient checks).

use super::{AdamWConfig, AdapterShape, AslConfig, AttnShape, Backend, MoeShape, VptHeadShape};
use crate::ops::real::{cast, Real};
use crate::ops::{adamw, attention, gelu, head, layernorm, linear, tokens};

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

impl<T: Real> Backend for CpuBackend<T> {
    type Buf = Vec<T>;
    type Idx = Vec<u32>;

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

    fn patchify(&mut self, images: &Vec<T>, out: &mut Vec<T>, batch: usize, channels: usize, height: usize, width: usize, patch: usize) {
        tokens::cpu::patchify(images, out, batch, channels, height, width, patch);
    }

    fn embed_tokens(
        &mut self,
        patches: &Vec<T>,
        cls: &Vec<T>,
        pos: &Vec<T>,
        x: &mut Vec<T>,
        batch: usize,
        num_patches: usize,
        prompts: usize,
        dim: usize,
    ) {
        tokens::cpu::embed_tokens(patches, cls, pos, x, batch, num_patches, prompts, dim);
    }

    fn set_prompts(&mut self, prompts: &Vec<T>, layer: usize, x: &mut Vec<T>, batch: usize, tokens: usize, count: usize, dim: usize) {
        tokens::cpu::set_prompts(prompts, layer, x, batch, tokens, count, dim);
    }

    fn prompt_grad(
        &mut self,
        dx: &mut Vec<T>,
        dprompts: &mut Vec<T>,
        layer: usize,
        batch: usize,
        tokens: usize,
        count: usize,
        dim: usize,
        zero_rows: bool,
    ) {
        tokens::cpu::prompt_grad(dx, dprompts, layer, batch, tokens, count, dim, zero_rows);
    }

    fn copy_tokens(
        &mut self,
        src: &Vec<T>,
        src_tokens: usize,
        src_start: usize,
        dst: &mut Vec<T>,
        dst_tokens: usize,
        dst_start: usize,
        count: usize,
        batch: usize,
        dim: usize,
    ) {
        tokens::cpu::copy_tokens(src, src_tokens, src_start, dst, dst_tokens, dst_start, count, batch, dim);
    }

    fn residual(&mut self, x: &Vec<T>, f: &Vec<T>, ls: Option<&Vec<T>>, out: &mut Vec<T>, rows: usize, dim: usize) {
        tokens::cpu::residual(x, f, ls.map(|l| l.as_slice()), out, rows, dim);
    }

    fn mul_cols(&mut self, src: &Vec<T>, v: &Vec<T>, out: &mut Vec<T>, rows: usize, dim: usize) {
        tokens::cpu::mul_cols(src, v, out, rows, dim);
    }

    fn linear_forward(&mut self, x: &Vec<T>, w: &Vec<T>, bias: Option<&Vec<T>>, y: &mut Vec<T>, rows: usize, d_in: usize, d_out: usize) {
        linear::cpu::forward(x, w, bias.map(|b| b.as_slice()), y, rows, d_in, d_out);
    }
    fn linear_backward_input(
        &mut self,
        dy: &Vec<T>,
        w: &Vec<T>,
        dx: &mut Vec<T>,
        rows: usize,
        d_in: usize,
        d_out: usize,
        accumulate: bool,
    ) {
        linear::cpu::backward_input(dy, w, dx, rows, d_in, d_out, accumulate);
    }
    fn layernorm_forward(
        &mut self,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        rstd: &mut Vec<T>,
        rows: usize,
        dim: usize,
        eps: f64,
    ) {
        layernorm::cpu::forward(x, gamma, beta, y, mean, rstd, rows, dim, eps);
    }
    fn layernorm_backward(
        &mut self,
        dy: &Vec<T>,
        x: &Vec<T>,
        gamma: &Vec<T>,
        mean: &Vec<T>,
        rstd: &Vec<T>,
        dx: &mut Vec<T>,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        layernorm::cpu::backward(dy, x, gamma, mean, rstd, dx, rows, dim, accumulate);
    }
    fn gelu_forward(&mut self, x: &Vec<T>, y: &mut Vec<T>, len: usize) {
        gelu::cpu::forward(x, y, len);
    }
    fn gelu_backward(&mut self, x: &Vec<T>, d: &mut Vec<T>, len: usize) {
        gelu::cpu::backward(x, d, len);
    }
    fn attention_forward(&mut self, qkv: &Vec<T>, out: &mut Vec<T>, lse: &mut Vec<T>, shape: &AttnShape) {
        attention::cpu::forward(qkv, out, lse, shape, &mut self.scratch);
    }
    fn attention_backward(&mut self, qkv: &Vec<T>, out: &Vec<T>, lse: &Vec<T>, dout: &Vec<T>, dqkv: &mut Vec<T>, shape: &AttnShape) {
        attention::cpu::backward(qkv, out, lse, dout, dqkv, shape, &mut self.scratch);
    }
    fn adapter_forward(
        &mut self,
        z: &Vec<T>,
        w1: &Vec<T>,
        b1: &Vec<T>,
        w2: &Vec<T>,
        b2: &Vec<T>,
        u: &mut Vec<T>,
        out: &mut Vec<T>,
        shape: &AdapterShape,
    ) {
        head::cpu::adapter_forward(z, w1, b1, w2, b2, u, out, shape, &mut self.scratch);
    }
    fn adapter_backward(
        &mut self,
        dout: &Vec<T>,
        z: &Vec<T>,
        u: &Vec<T>,
        w1: &Vec<T>,
        w2: &Vec<T>,
        dz: &mut Vec<T>,
        dw1: &mut Vec<T>,
        db1: &mut Vec<T>,
        dw2: &mut Vec<T>,
        db2: &mut Vec<T>,
        shape: &AdapterShape,
    ) {
        head::cpu::adapter_backward(dout, z, u, w1, w2, dz, dw1, db1, dw2, db2, shape, &mut self.scratch);
    }
    fn moe_forward(
        &mut self,
        z: &Vec<T>,
        adapted: &Vec<T>,
        gate: &Vec<T>,
        w: &Vec<T>,
        c: &Vec<T>,
        tok: &Vec<u32>,
        grow: &Vec<u32>,
        y: &mut Vec<T>,
        m: &mut Vec<T>,
        q: &mut Vec<T>,
        r: &mut Vec<T>,
        shape: &MoeShape,
    ) {
        head::cpu::moe_forward(z, adapted, gate, w, c, tok, grow, y, m, q, r, shape);
    }
    fn moe_backward(
        &mut self,
        dy: &Vec<T>,
        dm: &Vec<T>,
        z: &Vec<T>,
        adapted: &Vec<T>,
        gate: &Vec<T>,
        w: &Vec<T>,
        tok: &Vec<u32>,
        grow: &Vec<u32>,
        q: &Vec<T>,
        r: &Vec<T>,
        dz: &mut Vec<T>,
        dadapted: &mut Vec<T>,
        dgate: &mut Vec<T>,
        dw: &mut Vec<T>,
        dc: &mut Vec<T>,
        shape: &MoeShape,
    ) {
        head::cpu::moe_backward(
            dy,
            dm,
            z,
            adapted,
            gate,
            w,
            tok,
            grow,
            q,
            r,
            dz,
            dadapted,
            dgate,
            dw,
            dc,
            shape,
            &mut self.scratch,
        );
    }
    fn vpt_head_forward(&mut self, z: &Vec<T>, w: &Vec<T>, c: &Vec<T>, zbar: &mut Vec<T>, y: &mut Vec<T>, shape: &VptHeadShape) {
        head::cpu::vpt_forward(z, w, c, zbar, y, shape);
    }
    fn vpt_head_backward(
        &mut self,
        dy: &Vec<T>,
        zbar: &Vec<T>,
        w: &Vec<T>,
        dz: &mut Vec<T>,
        dw: &mut Vec<T>,
        dc: &mut Vec<T>,
        shape: &VptHeadShape,
    ) {
        head::cpu::vpt_backward(dy, zbar, w, dz, dw, dc, shape, &mut self.scratch);
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
