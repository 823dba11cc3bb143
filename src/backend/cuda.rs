//! The CUDA backend (feature `cuda`): the [`Backend`] ops on one device and one stream.
//!
//! Precision, first version: every `Buf` is fp32 device memory (activations, master weights,
//! gradients, optimizer state). Dense projections are cuBLAS GEMMs on fp32 buffers with TF32
//! inputs and fp32 accumulation (tensor cores; TF32 keeps more mantissa than bf16).
//! The kernels that exist only in bf16 storage (LayerNorm, GELU, fused attention, the head's
//! token inputs) get their bf16 operands by a cast into backend-owned scratch and their bf16
//! results cast back; gradients they accumulate are produced in bf16 and added in fp32, so the
//! residual-stream gradient is never rounded to bf16 as a whole. Head dims the fused attention
//! kernels do not cover run a plain fp32 attention (`ops::tokens::cuda`).
//!
//! Errors: the trait's ops return nothing, so the first [`GpuError`] is kept, later ops are
//! skipped, and [`Backend::check`] (called by the `Trainer` after each phase) reports it.
//! Scratch buffers grow to the largest size an op asks for and are then reused: no device
//! allocation per step once the shapes are fixed. Host synchronisation in a step: one, reading
//! the loss of [`Backend::asl_terms`] (all ASL terms in one launch); downloads synchronise too.

use super::{AdamWConfig, AdapterShape, AslConfig, AttnShape, Backend, MoeShape, VptHeadShape};
use crate::gpu::{bf16, CudaSlice, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use crate::ops::head::cuda::{HeadWorkspace, IndexTable};
use crate::ops::{adamw, asl, attention, cast, gelu, head, layernorm, tokens};
use std::cell::RefCell;

/// A `u32` table on the device: the host copy, and the head's inverted [`IndexTable`] built
/// on first use for the value range the op's shape gives.
pub struct CudaIdx {
    host: Vec<u32>,
    table: RefCell<Option<IndexTable>>,
}

/// Scratch slots: bf16 casts of up to five operands, and two fp32 buffers.
#[derive(Default)]
struct Scratch {
    bf: [Option<CudaSlice<bf16>>; 5],
    f: [Option<CudaSlice<f32>>; 2],
}

fn grow<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(gpu: &GpuContext, slot: &'a mut Option<CudaSlice<T>>, len: usize) -> Result<&'a mut CudaSlice<T>, GpuError> {
    let len = len.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None; // free first: the old buffer is too small anyway
        *slot = Some(gpu.zeros(len)?);
    }
    slot.as_mut().ok_or_else(|| GpuError::invalid("scratch", "allocation vanished"))
}

/// The CUDA backend. See the module docs.
pub struct CudaBackend {
    gpu: GpuContext,
    asl_ws: asl::cuda::AslWorkspace,
    head_ws: HeadWorkspace,
    loss: CudaSlice<f32>,
    scratch: Scratch,
    error: RefCell<Option<GpuError>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("gpu", &self.gpu).finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal`. Errors say what is missing (driver, device, cuBLAS, a kernel
    /// module that does not load on this GPU).
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        let gpu = GpuContext::new(ordinal)?;
        // cuBLAS is needed for every dense projection: fail now rather than at the first step.
        gpu.blas()?;
        // Dense projections on tensor cores: TF32 inputs (finer than bf16), fp32 accumulation.
        gpu.allow_tf32(true);
        let asl_ws = asl::cuda::AslWorkspace::new(&gpu)?;
        let loss = gpu.zeros(1)?;
        Ok(Self { gpu, asl_ws, head_ws: HeadWorkspace::new(), loss, scratch: Scratch::default(), error: RefCell::new(None) })
    }

    /// The device context.
    pub fn gpu(&self) -> &GpuContext {
        &self.gpu
    }

    fn failed(&self) -> bool {
        self.error.borrow().is_some()
    }

    /// Keeps the first error.
    fn record(&self, r: Result<(), GpuError>) {
        if let Err(e) = r {
            let mut slot = self.error.borrow_mut();
            if slot.is_none() {
                *slot = Some(e);
            }
        }
    }

    /// Runs `f` unless an earlier op failed, keeping its error.
    fn run(&mut self, f: impl FnOnce(&mut Self) -> Result<(), GpuError>) {
        if !self.failed() {
            let r = f(self);
            self.record(r);
        }
    }
}

/// `dst (+)= src` in fp32, where `src` is a bf16 result: cast into `tmp`, then add or copy.
fn add_bf16(gpu: &GpuContext, src: &CudaSlice<bf16>, tmp: &mut Option<CudaSlice<f32>>, dst: &mut CudaSlice<f32>, len: usize, accumulate: bool) -> Result<(), GpuError> {
    let s = gpu.stream();
    if !accumulate {
        return cast::cuda::bf16_to_f32(gpu, s, src, dst, len);
    }
    let t = grow(gpu, tmp, len)?;
    cast::cuda::bf16_to_f32(gpu, s, src, t, len)?;
    tokens::cuda::axpby(gpu, s, 1.0, dst, 1.0, t, len)
}

/// A bf16 copy of `src[..len]` in `slot`.
fn to_bf16<'a>(gpu: &GpuContext, slot: &'a mut Option<CudaSlice<bf16>>, src: &CudaSlice<f32>, len: usize) -> Result<&'a mut CudaSlice<bf16>, GpuError> {
    let b = grow(gpu, slot, len)?;
    cast::cuda::f32_to_bf16(gpu, gpu.stream(), src, b, len)?;
    Ok(b)
}

/// A zeroed bf16 scratch of `len`.
fn zeroed_bf16<'a>(gpu: &GpuContext, slot: &'a mut Option<CudaSlice<bf16>>, len: usize) -> Result<&'a mut CudaSlice<bf16>, GpuError> {
    let b = grow(gpu, slot, len)?;
    gpu.stream().memset_zeros(&mut b.slice_mut(0..len.max(1))).map_err(GpuError::driver("zeroing scratch"))?;
    Ok(b)
}

impl CudaIdx {
    fn table(&self, gpu: &GpuContext, range: usize) -> Result<std::cell::Ref<'_, IndexTable>, GpuError> {
        let stale = self.table.borrow().as_ref().is_none_or(|t| t.range() != range);
        if stale {
            *self.table.borrow_mut() = Some(IndexTable::new(gpu, &self.host, range)?);
        }
        std::cell::Ref::filter_map(self.table.borrow(), |t| t.as_ref()).map_err(|_| GpuError::invalid("index table", "not built"))
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Idx = CudaIdx;

    fn name(&self) -> String {
        format!("cuda-f32+bf16 ({})", self.gpu.device_name())
    }

    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(e) = self.error.borrow_mut().take() {
            return Err(anyhow::Error::new(e).context(format!("GPU {} failed", self.gpu.device_name())));
        }
        // Asynchronous kernel faults surface at the next synchronisation.
        self.gpu.synchronize()?;
        Ok(())
    }

    fn alloc(&mut self, len: usize) -> CudaSlice<f32> {
        match self.gpu.zeros(len.max(1)) {
            Ok(b) => b,
            Err(e) => {
                self.record(Err(e));
                // A one-element placeholder: later ops fail their length checks or are skipped;
                // `check` reports the allocation error.
                self.gpu.zeros(1).unwrap_or_else(|_| panic!("CUDA device unusable: {}", self.error.borrow().as_ref().map(|e| e.to_string()).unwrap_or_default()))
            }
        }
    }
    fn buf_len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn upload(&mut self, src: &[f32], dst: &mut CudaSlice<f32>) {
        self.run(|be| {
            if src.len() > dst.len() {
                return Err(GpuError::invalid("upload", format!("{} values into a buffer of {}", src.len(), dst.len())));
            }
            if src.is_empty() {
                return Ok(());
            }
            be.gpu.stream().memcpy_htod(src, &mut dst.slice_mut(0..src.len())).map_err(GpuError::driver(format!("uploading {} values", src.len())))
        });
    }
    fn upload_f64(&mut self, src: &[f64], dst: &mut CudaSlice<f32>) {
        let v: Vec<f32> = src.iter().map(|&x| x as f32).collect();
        self.upload(&v, dst);
    }
    fn download(&self, src: &CudaSlice<f32>, dst: &mut [f32]) {
        if self.failed() {
            dst.fill(f32::NAN);
            return;
        }
        let n = dst.len();
        let r = (|| {
            if n > src.len() {
                return Err(GpuError::invalid("download", format!("{n} values from a buffer of {}", src.len())));
            }
            if n == 0 {
                return Ok(());
            }
            let s = self.gpu.stream();
            s.memcpy_dtoh(&src.slice(0..n), dst).map_err(GpuError::driver(format!("downloading {n} values")))?;
            self.gpu.synchronize()
        })();
        if r.is_err() {
            dst.fill(f32::NAN);
        }
        self.record(r);
    }
    fn download_f64(&self, src: &CudaSlice<f32>, dst: &mut [f64]) {
        let mut v = vec![0.0f32; dst.len()];
        self.download(src, &mut v);
        for (d, s) in dst.iter_mut().zip(v) {
            *d = s as f64;
        }
    }
    fn upload_idx(&mut self, src: &[u32]) -> CudaIdx {
        CudaIdx { host: src.to_vec(), table: RefCell::new(None) }
    }
    fn fill(&mut self, buf: &mut CudaSlice<f32>, len: usize, value: f64) {
        self.run(|be| tokens::cuda::fill(&be.gpu, be.gpu.stream(), buf, len, value as f32));
    }
    fn copy(&mut self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, len: usize) {
        self.run(|be| {
            if len == 0 {
                return Ok(());
            }
            if len > src.len() || len > dst.len() {
                return Err(GpuError::invalid("copy", format!("{len} values between buffers of {} and {}", src.len(), dst.len())));
            }
            be.gpu.stream().memcpy_dtod(&src.slice(0..len), &mut dst.slice_mut(0..len)).map_err(GpuError::driver("copying on the device"))
        });
    }
    fn axpby(&mut self, a: f64, y: &mut CudaSlice<f32>, b: f64, x: &CudaSlice<f32>, len: usize) {
        self.run(|be| tokens::cuda::axpby(&be.gpu, be.gpu.stream(), a as f32, y, b as f32, x, len));
    }

    fn patchify(&mut self, images: &CudaSlice<f32>, out: &mut CudaSlice<f32>, batch: usize, channels: usize, height: usize, width: usize, patch: usize) {
        self.run(|be| tokens::cuda::patchify(&be.gpu, be.gpu.stream(), images, out, batch, channels, height, width, patch));
    }
    fn embed_tokens(&mut self, patches: &CudaSlice<f32>, cls: &CudaSlice<f32>, pos: &CudaSlice<f32>, x: &mut CudaSlice<f32>, batch: usize, num_patches: usize, prompts: usize, dim: usize) {
        self.run(|be| tokens::cuda::embed_tokens(&be.gpu, be.gpu.stream(), patches, cls, pos, x, batch, num_patches, prompts, dim));
    }
    fn set_prompts(&mut self, prompts: &CudaSlice<f32>, layer: usize, x: &mut CudaSlice<f32>, batch: usize, tokens: usize, count: usize, dim: usize) {
        self.run(|be| tokens::cuda::set_prompts(&be.gpu, be.gpu.stream(), prompts, layer, x, batch, tokens, count, dim));
    }
    fn prompt_grad(&mut self, dx: &mut CudaSlice<f32>, dprompts: &mut CudaSlice<f32>, layer: usize, batch: usize, tokens: usize, count: usize, dim: usize, zero_rows: bool) {
        self.run(|be| tokens::cuda::prompt_grad(&be.gpu, be.gpu.stream(), dx, dprompts, layer, batch, tokens, count, dim, zero_rows));
    }
    fn copy_tokens(&mut self, src: &CudaSlice<f32>, src_tokens: usize, src_start: usize, dst: &mut CudaSlice<f32>, dst_tokens: usize, dst_start: usize, count: usize, batch: usize, dim: usize) {
        self.run(|be| tokens::cuda::copy_tokens(&be.gpu, be.gpu.stream(), src, src_tokens, src_start, dst, dst_tokens, dst_start, count, batch, dim));
    }
    fn residual(&mut self, x: &CudaSlice<f32>, f: &CudaSlice<f32>, ls: Option<&CudaSlice<f32>>, out: &mut CudaSlice<f32>, rows: usize, dim: usize) {
        self.run(|be| tokens::cuda::residual(&be.gpu, be.gpu.stream(), x, f, ls.map(|l| l as &dyn DevicePtr<f32>), out, rows, dim));
    }
    fn mul_cols(&mut self, src: &CudaSlice<f32>, v: &CudaSlice<f32>, out: &mut CudaSlice<f32>, rows: usize, dim: usize) {
        self.run(|be| tokens::cuda::mul_cols(&be.gpu, be.gpu.stream(), src, v, out, rows, dim));
    }

    fn linear_forward(&mut self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, y: &mut CudaSlice<f32>, rows: usize, d_in: usize, d_out: usize) {
        self.run(|be| be.gpu.linear_forward::<f32, f32>(x, w, bias.map(|b| b as &dyn DevicePtr<f32>), y, rows, d_out, d_in, false));
    }
    fn linear_backward_input(&mut self, dy: &CudaSlice<f32>, w: &CudaSlice<f32>, dx: &mut CudaSlice<f32>, rows: usize, d_in: usize, d_out: usize, accumulate: bool) {
        self.run(|be| be.gpu.linear_backward_input::<f32, f32>(dy, w, dx, rows, d_out, d_in, accumulate));
    }
    fn layernorm_forward(&mut self, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>, y: &mut CudaSlice<f32>, mean: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>, rows: usize, dim: usize, eps: f64) {
        self.run(|be| {
            let (g, [a, b, ..]) = (&be.gpu, &mut be.scratch.bf);
            let n = rows * dim;
            let xb = to_bf16(g, a, x, n)?;
            let yb = grow(g, b, n)?;
            layernorm::cuda::forward(g, g.stream(), xb, gamma, beta, yb, mean, rstd, rows, dim, eps)?;
            cast::cuda::bf16_to_f32(g, g.stream(), yb, y, n)
        });
    }
    fn layernorm_backward(&mut self, dy: &CudaSlice<f32>, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, mean: &CudaSlice<f32>, rstd: &CudaSlice<f32>, dx: &mut CudaSlice<f32>, rows: usize, dim: usize, accumulate: bool) {
        self.run(|be| {
            let (g, [a, b, c, ..], [t, ..]) = (&be.gpu, &mut be.scratch.bf, &mut be.scratch.f);
            let n = rows * dim;
            let dyb = to_bf16(g, a, dy, n)?;
            let xb = to_bf16(g, b, x, n)?;
            let dxb = grow(g, c, n)?;
            layernorm::cuda::backward(g, g.stream(), dyb, xb, gamma, mean, rstd, dxb, rows, dim, false)?;
            add_bf16(g, dxb, t, dx, n, accumulate)
        });
    }
    fn gelu_forward(&mut self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, len: usize) {
        self.run(|be| {
            let (g, [a, b, ..]) = (&be.gpu, &mut be.scratch.bf);
            let xb = to_bf16(g, a, x, len)?;
            let yb = grow(g, b, len)?;
            gelu::cuda::forward(g, g.stream(), xb, None, yb, 1, len)?;
            cast::cuda::bf16_to_f32(g, g.stream(), yb, y, len)
        });
    }
    fn gelu_backward(&mut self, x: &CudaSlice<f32>, d: &mut CudaSlice<f32>, len: usize) {
        self.run(|be| {
            let (g, [a, b, ..]) = (&be.gpu, &mut be.scratch.bf);
            let xb = to_bf16(g, a, x, len)?;
            let db = to_bf16(g, b, d, len)?;
            gelu::cuda::backward_in_place(g, g.stream(), xb, None, db, 1, len)?;
            cast::cuda::bf16_to_f32(g, g.stream(), db, d, len)
        });
    }

    fn attention_forward(&mut self, qkv: &CudaSlice<f32>, out: &mut CudaSlice<f32>, lse: &mut CudaSlice<f32>, shape: &AttnShape) {
        self.run(|be| {
            let g = &be.gpu;
            if !attention::cuda::HEAD_DIMS.contains(&shape.head_dim) {
                return tokens::cuda::attention_forward(g, g.stream(), qkv, out, lse, shape);
            }
            let [a, b, ..] = &mut be.scratch.bf;
            let nq = shape.batch * shape.q_len * shape.dim();
            let qb = to_bf16(g, a, qkv, shape.batch * shape.tokens * 3 * shape.dim())?;
            let ob = grow(g, b, nq)?;
            attention::cuda::forward(g, g.stream(), qb, ob, lse, shape)?;
            cast::cuda::bf16_to_f32(g, g.stream(), ob, out, nq)
        });
    }
    fn attention_backward(&mut self, qkv: &CudaSlice<f32>, out: &CudaSlice<f32>, lse: &CudaSlice<f32>, dout: &CudaSlice<f32>, dqkv: &mut CudaSlice<f32>, shape: &AttnShape) {
        self.run(|be| {
            let g = &be.gpu;
            if !attention::cuda::HEAD_DIMS.contains(&shape.head_dim) {
                return tokens::cuda::attention_backward(g, g.stream(), qkv, out, lse, dout, dqkv, shape);
            }
            let ([a, b, c, d, _], [t, ..]) = (&mut be.scratch.bf, &mut be.scratch.f);
            let full = shape.batch * shape.tokens * 3 * shape.dim();
            let nq = shape.batch * shape.q_len * shape.dim();
            let qb = to_bf16(g, a, qkv, full)?;
            let ob = to_bf16(g, b, out, nq)?;
            let gb = to_bf16(g, c, dout, nq)?;
            let db = grow(g, d, full)?;
            let sc = grow(g, t, attention::cuda::backward_scratch_len(shape))?;
            attention::cuda::backward(g, g.stream(), qb, ob, lse, gb, db, sc, shape)?;
            cast::cuda::bf16_to_f32(g, g.stream(), db, dqkv, full)
        });
    }

    fn adapter_forward(&mut self, z: &CudaSlice<f32>, w1: &CudaSlice<f32>, b1: &CudaSlice<f32>, w2: &CudaSlice<f32>, b2: &CudaSlice<f32>, u: &mut CudaSlice<f32>, out: &mut CudaSlice<f32>, shape: &AdapterShape) {
        self.run(|be| {
            let (g, [a, b, ..]) = (&be.gpu, &mut be.scratch.bf);
            let n = shape.batch * shape.tokens * shape.dim;
            let zb = to_bf16(g, a, z, n)?;
            let ob = grow(g, b, n)?;
            head::cuda::adapter_forward(g, g.stream(), zb, w1, b1, w2, b2, u, ob, shape)?;
            cast::cuda::bf16_to_f32(g, g.stream(), ob, out, n)
        });
    }
    fn adapter_backward(&mut self, dout: &CudaSlice<f32>, z: &CudaSlice<f32>, u: &CudaSlice<f32>, w1: &CudaSlice<f32>, w2: &CudaSlice<f32>, dz: &mut CudaSlice<f32>, dw1: &mut CudaSlice<f32>, db1: &mut CudaSlice<f32>, dw2: &mut CudaSlice<f32>, db2: &mut CudaSlice<f32>, shape: &AdapterShape) {
        self.run(|be| {
            let (g, [a, b, c, ..], [t, ..], ws) = (&be.gpu, &mut be.scratch.bf, &mut be.scratch.f, &mut be.head_ws);
            let n = shape.batch * shape.tokens * shape.dim;
            let gb = to_bf16(g, a, dout, n)?;
            let zb = to_bf16(g, b, z, n)?;
            let dzb = zeroed_bf16(g, c, n)?;
            head::cuda::adapter_backward(g, g.stream(), ws, gb, zb, u, w1, w2, dzb, dw1, db1, dw2, db2, shape)?;
            add_bf16(g, dzb, t, dz, n, true)
        });
    }
    fn moe_forward(&mut self, z: &CudaSlice<f32>, adapted: &CudaSlice<f32>, gate: &CudaSlice<f32>, w: &CudaSlice<f32>, c: &CudaSlice<f32>, tok: &CudaIdx, grow_: &CudaIdx, y: &mut CudaSlice<f32>, m: &mut CudaSlice<f32>, q: &mut CudaSlice<f32>, r: &mut CudaSlice<f32>, shape: &MoeShape) {
        self.run(|be| {
            let (g, [a, b, ..]) = (&be.gpu, &mut be.scratch.bf);
            let n = shape.batch * shape.tokens * shape.dim;
            let zb = to_bf16(g, a, z, n)?;
            let ab = to_bf16(g, b, adapted, n)?;
            let (tt, gt) = (tok.table(g, shape.tokens)?, grow_.table(g, shape.gate_rows)?);
            head::cuda::moe_forward(g, g.stream(), zb, ab, gate, w, c, &tt, &gt, y, m, q, r, shape)
        });
    }
    fn moe_backward(&mut self, dy: &CudaSlice<f32>, dm: &CudaSlice<f32>, z: &CudaSlice<f32>, adapted: &CudaSlice<f32>, gate: &CudaSlice<f32>, w: &CudaSlice<f32>, tok: &CudaIdx, grow_: &CudaIdx, q: &CudaSlice<f32>, r: &CudaSlice<f32>, dz: &mut CudaSlice<f32>, dadapted: &mut CudaSlice<f32>, dgate: &mut CudaSlice<f32>, dw: &mut CudaSlice<f32>, dc: &mut CudaSlice<f32>, shape: &MoeShape) {
        self.run(|be| {
            let (g, [a, b, c, d, _], [t, ..], ws) = (&be.gpu, &mut be.scratch.bf, &mut be.scratch.f, &mut be.head_ws);
            let n = shape.batch * shape.tokens * shape.dim;
            let zb = to_bf16(g, a, z, n)?;
            let ab = to_bf16(g, b, adapted, n)?;
            let dzb = zeroed_bf16(g, c, n)?;
            let dab = zeroed_bf16(g, d, n)?;
            let (tt, gt) = (tok.table(g, shape.tokens)?, grow_.table(g, shape.gate_rows)?);
            head::cuda::moe_backward(g, g.stream(), ws, dy, dm, zb, ab, gate, w, &tt, &gt, q, r, dzb, dab, dgate, dw, dc, shape)?;
            add_bf16(g, dzb, t, dz, n, true)?;
            add_bf16(g, dab, t, dadapted, n, true)
        });
    }
    fn vpt_head_forward(&mut self, z: &CudaSlice<f32>, w: &CudaSlice<f32>, c: &CudaSlice<f32>, zbar: &mut CudaSlice<f32>, y: &mut CudaSlice<f32>, shape: &VptHeadShape) {
        self.run(|be| {
            let (g, [a, ..]) = (&be.gpu, &mut be.scratch.bf);
            let zb = to_bf16(g, a, z, shape.batch * shape.tokens * shape.dim)?;
            head::cuda::vpt_forward(g, g.stream(), zb, w, c, zbar, y, shape)
        });
    }
    fn vpt_head_backward(&mut self, dy: &CudaSlice<f32>, zbar: &CudaSlice<f32>, w: &CudaSlice<f32>, dz: &mut CudaSlice<f32>, dw: &mut CudaSlice<f32>, dc: &mut CudaSlice<f32>, shape: &VptHeadShape) {
        self.run(|be| {
            let (g, [a, ..], ws) = (&be.gpu, &mut be.scratch.bf, &mut be.head_ws);
            let n = shape.batch * shape.tokens * shape.dim;
            let dzb = grow(g, a, n)?;
            head::cuda::vpt_backward(g, g.stream(), ws, dy, zbar, w, dzb, dw, dc, shape)?;
            cast::cuda::bf16_to_f32(g, g.stream(), dzb, dz, n)
        });
    }

    fn asl(&mut self, logits: &CudaSlice<f32>, targets: &CudaSlice<f32>, len: usize, cfg: &AslConfig, scale: f64, grad: Option<&mut CudaSlice<f32>>) -> f64 {
        let mut out = f64::NAN;
        self.run(|be| {
            let g = &be.gpu;
            asl::cuda::forward_backward(g, g.stream(), &mut be.asl_ws, logits, targets, cfg, scale as f32, grad.map(|b| b as &mut dyn DevicePtrMut<f32>), &mut be.loss, len)?;
            let mut host = [0.0f32];
            g.stream().memcpy_dtoh(&be.loss, &mut host[..]).map_err(GpuError::driver("reading the loss"))?;
            g.synchronize()?;
            out = host[0] as f64;
            Ok(())
        });
        out
    }
    fn asl_terms(&mut self, terms: &mut [(&CudaSlice<f32>, Option<&mut CudaSlice<f32>>)], targets: &CudaSlice<f32>, len: usize, cfg: &AslConfig, scale: f64) -> f64 {
        let mut out = 0.0;
        self.run(|be| {
            let g = &be.gpu;
            // One launch per MAX_TERMS terms (the training loss has at most four), each
            // writing `loss`, which is read back (one host synchronisation per launch).
            for chunk in terms.chunks_mut(asl::cuda::MAX_TERMS) {
                let mut ts: Vec<asl::cuda::AslTerm<'_>> = chunk
                    .iter_mut()
                    .map(|(l, gr)| asl::cuda::AslTerm { logits: *l as &dyn DevicePtr<f32>, grad: gr.as_deref_mut().map(|b| b as &mut dyn DevicePtrMut<f32>) })
                    .collect();
                asl::cuda::forward_backward_terms(g, g.stream(), &mut be.asl_ws, &mut ts, targets, cfg, scale as f32, &mut be.loss, len)?;
                let mut host = [0.0f32];
                g.stream().memcpy_dtoh(&be.loss, &mut host[..]).map_err(GpuError::driver("reading the loss"))?;
                g.synchronize()?;
                out += host[0] as f64;
            }
            Ok(())
        });
        if self.failed() {
            f64::NAN
        } else {
            out
        }
    }
    fn adamw(&mut self, params: &mut [CudaSlice<f32>], grads: &[CudaSlice<f32>], m: &mut [CudaSlice<f32>], v: &mut [CudaSlice<f32>], step: u64, lr: f64, cfg: &AdamWConfig) {
        self.run(|be| {
            let g = &be.gpu;
            if grads.len() != params.len() || m.len() != params.len() || v.len() != params.len() {
                return Err(GpuError::invalid("adamw", "params, grads and moments differ in count"));
            }
            for i in 0..params.len() {
                let n = params[i].len();
                adamw::cuda::step(g, g.stream(), &mut params[i], &grads[i], &mut m[i], &mut v[i], n, step, lr, cfg)?;
            }
            Ok(())
        });
    }
}
