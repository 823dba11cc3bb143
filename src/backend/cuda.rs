//! The CUDA backend (feature `cuda`): the [`Backend`] ops on one device and one stream.
//!
//! **Precision.** A buffer ([`DevBuf`]) is fp32 or bf16 device memory, chosen when it is
//! allocated ([`Backend::alloc_as`]) from its [`BufRole`] and the backend's [`Precision`]:
//! - [`Precision::Bf16`] (the default, [`CudaBackend::new`]): activations
//!   ([`BufRole::Activation`]: normalised tokens, qkv, attention outputs, MLP hidden states,
//!   projection outputs and their gradients) and the frozen weight matrices
//!   ([`BufRole::Frozen`]; no fp32 master, they never change) are bf16. Trainable parameters,
//!   gradients, AdamW moments, logits, loss terms, LayerNorm statistics, attention
//!   log-sum-exps, the head's small internals and the residual stream with its gradient stay
//!   fp32 ([`BufRole::State`]), as PyTorch autocast keeps them. Dense projections are cuBLAS
//!   GEMMs with bf16 operands and fp32 compute, writing bf16 or fp32 as the destination is
//!   stored; every kernel accumulates in fp32.
//! - [`Precision::F32`] ([`CudaBackend::with_precision`], for comparisons and debugging): every
//!   buffer fp32, GEMMs with TF32 inputs and fp32 accumulation.
//!
//! Every op accepts its operands in whatever type they are stored: a kernel reads an operand
//! of its own type directly and otherwise a cast of it in backend-owned scratch (`Slot`), and
//! writes its destination directly when the types agree, else into scratch that is then cast
//! (or, for gradients the op accumulates, added in fp32) into the destination. In bf16 mode the
//! remaining casts in a step are the fp32 residual gradient fed to a GEMM (blocks without
//! LayerScale) and the bf16 results added into fp32 gradient sums (the head's `dz`). LayerNorm
//! reads the fp32 residual stream and writes its gradient in fp32 itself (kernels for either
//! storage), and the token kernels (`kernels/tokens.cu`) have fp32 and bf16 instantiations.
//! Head dims the fused attention kernels do not cover run the plain fp32 attention
//! (`ops::attention::cuda::plain_forward`/`plain_backward`) on fp32 casts.
//!
//! **Errors**: the trait's ops return nothing, so the first [`GpuError`] is kept, later ops are
//! skipped, and [`Backend::check`] (called by the `Trainer` when it reads results) reports it.
//! Scratch buffers grow to the largest size an op asks for and are then reused: no device
//! allocation per step once the shapes are fixed. **Synchronisation**: none inside a training
//! step. [`Backend::asl_terms_into`] leaves the loss on the device (every ASL term in one
//! launch), AdamW updates every trainable tensor in one launch guarded by that loss (a
//! non-finite loss changes nothing), and the `Trainer` reads the loss once, after the update is
//! queued; downloads synchronise too.

use super::{
    AdamWConfig, AdapterParams, AdapterShape, AslConfig, AttnShape, AugmentShape, Backend, BranchLogits, BranchParams, BufRole, Crop,
    GateTables, Grad, HeadInputs, LayerNormShape, LinearShape, MoeSaved, MoeShape, Norm, NormStats, PatchShape, Precision, Residual, Rows,
    TokenCopy, TokenShape, VptHeadShape, VptParams,
};
use crate::gpu::{bf16, CudaSlice, DevicePtr, DevicePtrMut, GemmType, GpuContext, GpuError};
use crate::ops::head::cuda::{HeadWorkspace, IndexTable};
use crate::ops::tokens::cuda::Storage;
use crate::ops::{adamw, asl, attention, augment, cast, gelu, head, layernorm, tokens};
use cudarc::driver::{CudaEvent, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use std::cell::RefCell;
use std::sync::Arc;

/// A buffer of the CUDA backend: fp32 or bf16 device memory (see the module docs).
pub enum DevBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl DevBuf {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            DevBuf::F32(s) => s.len(),
            DevBuf::Bf16(s) => s.len(),
        }
    }
    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether it is stored in bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self, DevBuf::Bf16(_))
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DevBuf::{}({} elements)",
            if self.is_bf16() { "Bf16" } else { "F32" },
            self.len()
        )
    }
}

/// A `u32` table on the device: the host copy, and the head's inverted [`IndexTable`] built
/// on first use for the value range the op's shape gives.
pub struct CudaIdx {
    host: Vec<u32>,
    table: RefCell<Option<IndexTable>>,
}

/// One scratch slot: room for one operand's cast (or a kernel's temporary) of either type,
/// allocated on first use and grown on demand.
#[derive(Default)]
struct Slot {
    f: Option<CudaSlice<f32>>,
    b: Option<CudaSlice<bf16>>,
}

/// Scratch slots: as many as the op with the most operands has (moe backward).
const SLOTS: usize = 14;

/// `slot` holding at least `len` elements (at least 1).
fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
    gpu: &GpuContext,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>, GpuError> {
    let len = len.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None; // free first: the old buffer is too small anyway
        *slot = Some(gpu.zeros(len)?);
    }
    slot.as_mut().ok_or_else(|| GpuError::invalid("scratch", "allocation vanished"))
}

/// `dst[..len] = src[..len]` on the device.
fn dtod<T: DeviceRepr>(gpu: &GpuContext, src: &CudaSlice<T>, dst: &mut CudaSlice<T>, len: usize) -> Result<(), GpuError> {
    if len == 0 {
        return Ok(());
    }
    if len > src.len() || len > dst.len() {
        return Err(GpuError::invalid(
            "copy",
            format!("{len} values between buffers of {} and {}", src.len(), dst.len()),
        ));
    }
    gpu.stream()
        .memcpy_dtod(&src.slice(0..len), &mut dst.slice_mut(0..len))
        .map_err(GpuError::driver("copying on the device"))
}

/// A storage type of [`DevBuf`]: how to find it in a buffer or a [`Slot`], and how to convert
/// from and to the other type.
trait Elem: GemmType + Storage + ValidAsZeroBits + Sized {
    fn of(buf: &DevBuf) -> Option<&CudaSlice<Self>>;
    /// The buffer's slice when it holds `Self`, else the buffer back.
    fn of_mut(buf: &mut DevBuf) -> Result<&mut CudaSlice<Self>, &mut DevBuf>;
    fn slot(slot: &mut Slot) -> &mut Option<CudaSlice<Self>>;
    /// `dst[..len] = src[..len]`, converted.
    fn cast_from(gpu: &GpuContext, src: &DevBuf, dst: &mut CudaSlice<Self>, len: usize) -> Result<(), GpuError>;
    /// `dst[..len] = src[..len]`, converted.
    fn cast_to(gpu: &GpuContext, src: &CudaSlice<Self>, dst: &mut DevBuf, len: usize) -> Result<(), GpuError>;
}

impl Elem for f32 {
    fn of(buf: &DevBuf) -> Option<&CudaSlice<f32>> {
        match buf {
            DevBuf::F32(s) => Some(s),
            DevBuf::Bf16(_) => None,
        }
    }
    fn of_mut(buf: &mut DevBuf) -> Result<&mut CudaSlice<f32>, &mut DevBuf> {
        match buf {
            DevBuf::F32(s) => Ok(s),
            other => Err(other),
        }
    }
    fn slot(slot: &mut Slot) -> &mut Option<CudaSlice<f32>> {
        &mut slot.f
    }
    fn cast_from(gpu: &GpuContext, src: &DevBuf, dst: &mut CudaSlice<f32>, len: usize) -> Result<(), GpuError> {
        match src {
            DevBuf::F32(s) => dtod(gpu, s, dst, len),
            DevBuf::Bf16(s) => cast::cuda::bf16_to_f32(gpu, gpu.stream(), s, dst, len),
        }
    }
    fn cast_to(gpu: &GpuContext, src: &CudaSlice<f32>, dst: &mut DevBuf, len: usize) -> Result<(), GpuError> {
        match dst {
            DevBuf::F32(d) => dtod(gpu, src, d, len),
            DevBuf::Bf16(d) => cast::cuda::f32_to_bf16(gpu, gpu.stream(), src, d, len),
        }
    }
}

impl Elem for bf16 {
    fn of(buf: &DevBuf) -> Option<&CudaSlice<bf16>> {
        match buf {
            DevBuf::Bf16(s) => Some(s),
            DevBuf::F32(_) => None,
        }
    }
    fn of_mut(buf: &mut DevBuf) -> Result<&mut CudaSlice<bf16>, &mut DevBuf> {
        match buf {
            DevBuf::Bf16(s) => Ok(s),
            other => Err(other),
        }
    }
    fn slot(slot: &mut Slot) -> &mut Option<CudaSlice<bf16>> {
        &mut slot.b
    }
    fn cast_from(gpu: &GpuContext, src: &DevBuf, dst: &mut CudaSlice<bf16>, len: usize) -> Result<(), GpuError> {
        match src {
            DevBuf::Bf16(s) => dtod(gpu, s, dst, len),
            DevBuf::F32(s) => cast::cuda::f32_to_bf16(gpu, gpu.stream(), s, dst, len),
        }
    }
    fn cast_to(gpu: &GpuContext, src: &CudaSlice<bf16>, dst: &mut DevBuf, len: usize) -> Result<(), GpuError> {
        match dst {
            DevBuf::Bf16(d) => dtod(gpu, src, d, len),
            DevBuf::F32(d) => cast::cuda::bf16_to_f32(gpu, gpu.stream(), src, d, len),
        }
    }
}

/// Runs `$body` with `$t` the element type of `$buf` (`f32` or `bf16`): one source for both
/// instantiations of an op.
macro_rules! with_type {
    ($buf:expr, $t:ident => $body:expr) => {
        if $buf.is_bf16() {
            type $t = bf16;
            $body
        } else {
            type $t = f32;
            $body
        }
    };
}

/// `buf` as a `T` operand of `len` elements: the buffer itself when it holds `T`, else its
/// cast into `slot`.
fn input<'a, T: Elem>(gpu: &GpuContext, buf: &'a DevBuf, slot: &'a mut Slot, len: usize) -> Result<&'a CudaSlice<T>, GpuError> {
    match T::of(buf) {
        Some(s) => Ok(s),
        None => {
            let s = grow(gpu, T::slot(slot), len)?;
            T::cast_from(gpu, buf, s, len)?;
            Ok(s)
        }
    }
}

/// How a kernel treats its destination, for when it must go through scratch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The kernel writes every element used; the scratch is cast into the destination.
    Write,
    /// The kernel reads and writes (in place, or only some elements): the scratch starts as a
    /// cast of the destination and is cast back.
    Update,
    /// `dst += result`: the kernel writes the scratch without accumulating (see
    /// [`Out::direct`]) and it is added into the destination in fp32.
    Add,
    /// As `Add` for kernels that always accumulate: the scratch starts at zero.
    AddZeroed,
}

/// A kernel's `T` destination: the buffer itself, or scratch that [`Out::done`] puts into it.
struct Out<'a, T: Elem> {
    buf: &'a mut CudaSlice<T>,
    back: Option<(&'a mut DevBuf, Mode)>,
    len: usize,
}

impl<T: Elem> Out<'_, T> {
    /// Whether the kernel writes the destination itself (so it may accumulate there).
    fn direct(&self) -> bool {
        self.back.is_none()
    }
    /// Moves a scratch result into the destination.
    fn done(self, gpu: &GpuContext) -> Result<(), GpuError> {
        let Some((dst, mode)) = self.back else {
            return Ok(());
        };
        match mode {
            Mode::Write | Mode::Update => T::cast_to(gpu, self.buf, dst, self.len),
            Mode::Add | Mode::AddZeroed => with_type!(dst, D => {
                let d = D::of_mut(dst).map_err(|_| GpuError::invalid("scratch", "destination type changed"))?;
                tokens::cuda::axpby::<D, T>(gpu, gpu.stream(), 1.0, d, 1.0, &*self.buf, self.len)
            }),
        }
    }
}

/// `buf` as a `T` destination of `len` elements (see [`Mode`]).
fn output<'a, T: Elem>(gpu: &GpuContext, buf: &'a mut DevBuf, slot: &'a mut Slot, len: usize, mode: Mode) -> Result<Out<'a, T>, GpuError> {
    match T::of_mut(buf) {
        Ok(b) => Ok(Out { buf: b, back: None, len }),
        Err(dst) => {
            if len > dst.len() {
                return Err(GpuError::invalid("output", format!("{len} values into a buffer of {}", dst.len())));
            }
            let s = grow(gpu, T::slot(slot), len)?;
            match mode {
                Mode::Update => T::cast_from(gpu, dst, s, len)?,
                Mode::AddZeroed if len > 0 => gpu
                    .stream()
                    .memset_zeros(&mut s.slice_mut(0..len))
                    .map_err(GpuError::driver("zeroing scratch"))?,
                _ => {}
            }
            Ok(Out {
                buf: s,
                back: Some((dst, mode)),
                len,
            })
        }
    }
}

/// The CUDA backend's [`Backend::Staging`]: one batch of uint8 crops on its way to the device.
/// The host writes the crop table and pixels into pinned memory; the copy stream moves them
/// into the device buffers and records `copied`; the compute stream waits for `copied` before
/// the augment kernel reads them and records `consumed` after it; the next copy into the same
/// buffers waits (on the device) for `consumed`, and the host waits for `copied` before it
/// rewrites the pinned memory. Everything grows to the largest batch staged.
pub struct DevStaging {
    host: Option<PinnedHostSlice<u8>>,
    crops: Option<CudaSlice<Crop>>,
    pixels: Option<CudaSlice<u8>>,
    /// Crops and pixel bytes of the batch staged last.
    staged: (usize, usize),
    /// `(copied, consumed)`, made on first use.
    events: Option<(CudaEvent, CudaEvent)>,
}

impl Drop for DevStaging {
    fn drop(&mut self) {
        // The buffers are freed after the fields drop: no copy may still read the pinned
        // memory, and no augment the device buffers (their stream-ordered free runs on the copy
        // stream, which does not otherwise wait for the compute stream).
        if let Some((copied, consumed)) = &self.events {
            let _ = copied.synchronize();
            let _ = consumed.synchronize();
        }
    }
}

impl std::fmt::Debug for DevStaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevStaging({} crops, {} pixel bytes)", self.staged.0, self.staged.1)
    }
}

/// `slot` holding at least `len` elements, allocated on `stream` (contents undefined).
fn grow_on<'a, T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>, GpuError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None;
        // Grown by half again, so batches of slowly varying size do not reallocate each time.
        // SAFETY: every byte a kernel reads is written by the copy that follows.
        *slot = Some(unsafe { stream.alloc::<T>(len + len / 2) }.map_err(GpuError::driver("allocating staging memory"))?);
    }
    slot.as_mut().ok_or_else(|| GpuError::invalid("staging", "allocation vanished"))
}

/// The CUDA backend. See the module docs.
pub struct CudaBackend {
    gpu: GpuContext,
    /// The second stream: host-to-device copies of staged batches ([`Backend::stage`]),
    /// overlapping the compute on the context's stream.
    copy: Arc<CudaStream>,
    precision: Precision,
    asl_ws: asl::cuda::AslWorkspace,
    head_ws: HeadWorkspace,
    loss: CudaSlice<f32>,
    scratch: [Slot; SLOTS],
    error: RefCell<Option<GpuError>>,
    /// Fused attention kernels chosen instead of the defaults (for their head dim).
    attn_fwd: Option<attention::FwdTiles>,
    attn_bwd: Option<attention::BwdTiles>,
    /// The head's contraction kernels (adapters, MoE).
    head_kernels: head::cuda::HeadKernels,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("precision", &self.precision)
            .finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal` in the default precision, [`Precision::Bf16`]. Errors say what is
    /// missing (driver, device, cuBLAS, a kernel module that does not load on this GPU).
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        Self::with_precision(ordinal, Precision::Bf16)
    }

    /// Opens device `ordinal` with activations and frozen weights stored in `precision`.
    pub fn with_precision(ordinal: usize, precision: Precision) -> Result<Self, GpuError> {
        let gpu = GpuContext::new(ordinal)?;
        // cuBLAS is needed for every dense projection: fail now rather than at the first step.
        gpu.blas()?;
        // fp32 GEMMs (all of them in F32 mode) on tensor cores: TF32 inputs, fp32 accumulation.
        gpu.allow_tf32(true);
        let asl_ws = asl::cuda::AslWorkspace::new(&gpu)?;
        let loss = gpu.zeros(1)?;
        let copy = gpu.context().new_stream().map_err(GpuError::driver("creating the copy stream"))?;
        Ok(Self {
            gpu,
            copy,
            precision,
            asl_ws,
            head_ws: HeadWorkspace::new(),
            loss,
            scratch: Default::default(),
            error: RefCell::new(None),
            attn_fwd: None,
            attn_bwd: None,
            head_kernels: head::cuda::HeadKernels::default(),
        })
    }

    /// Runs the fused attention of `fwd.head_dim` / `bwd.head_dim` with these compiled tile
    /// shapes (`attention::FWD_TILES`, `BWD_TILES`) instead of the defaults; `None` keeps the
    /// default. For measuring the alternatives in a whole step (`mlvpt bench-step
    /// --attention-kernels`).
    pub fn set_attention_tiles(&mut self, fwd: Option<attention::FwdTiles>, bwd: Option<attention::BwdTiles>) {
        self.attn_fwd = fwd;
        self.attn_bwd = bwd;
    }

    /// Runs the head's contractions (adapters, MoE) on these kernels instead of the default
    /// ([`head::cuda::HeadKernels::Mma`]). For measuring them in a whole step (`mlvpt bench-step
    /// --head-kernels`), or for fp32 sums.
    pub fn set_head_kernels(&mut self, kernels: head::cuda::HeadKernels) {
        self.head_kernels = kernels;
    }

    /// The device context.
    pub fn gpu(&self) -> &GpuContext {
        &self.gpu
    }

    /// The storage precision of activations and frozen weights.
    pub fn precision(&self) -> Precision {
        self.precision
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

    /// A zeroed buffer of `len` elements stored as `bf16` or fp32.
    fn zeros(&self, len: usize, bf16: bool) -> Result<DevBuf, GpuError> {
        let len = len.max(1);
        Ok(if bf16 {
            DevBuf::Bf16(self.gpu.zeros(len)?)
        } else {
            DevBuf::F32(self.gpu.zeros(len)?)
        })
    }
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

/// `y [rows, d_out] = x W^T + b` with `T` operands (cast where stored otherwise), `y` written
/// in its own type.
fn gemm_forward<T: Elem>(
    g: &GpuContext,
    s: &mut [Slot; SLOTS],
    x: &DevBuf,
    w: &DevBuf,
    bias: Option<&DevBuf>,
    y: &mut DevBuf,
    sh: &LinearShape,
) -> Result<(), GpuError> {
    let &LinearShape { rows, d_in, d_out } = sh;
    let [s0, s1, s2, s3, ..] = s;
    let xv = input::<T>(g, x, s0, rows * d_in)?;
    let wv = input::<T>(g, w, s1, d_out * d_in)?;
    let bv = bias.map(|b| input::<f32>(g, b, s2, d_out)).transpose()?;
    let bv = bv.map(|b| b as &dyn DevicePtr<f32>);
    if T::INDEX == f32::INDEX && y.is_bf16() {
        // cuBLAS has no fp32-operand GEMM with a bf16 result (CUBLAS_STATUS_NOT_SUPPORTED):
        // an fp32 result in scratch, cast.
        let o = output::<f32>(g, y, s3, rows * d_out, Mode::Write)?;
        crate::ops::linear::cuda::forward::<T, f32>(g, xv, wv, bv, &mut *o.buf, sh)?;
        return o.done(g);
    }
    match y {
        DevBuf::F32(o) => crate::ops::linear::cuda::forward::<T, f32>(g, xv, wv, bv, o, sh),
        DevBuf::Bf16(o) => crate::ops::linear::cuda::forward::<T, bf16>(g, xv, wv, bv, o, sh),
    }
}

/// `dx (+)= dy W` with `T` operands, `dx` written in its own type.
fn gemm_backward_input<T: Elem>(
    g: &GpuContext,
    s: &mut [Slot; SLOTS],
    dy: &DevBuf,
    w: &DevBuf,
    dx: Grad<&mut DevBuf>,
    sh: &LinearShape,
) -> Result<(), GpuError> {
    let &LinearShape { rows, d_in, d_out } = sh;
    let accumulate = dx.accumulates();
    let dx = dx.into_inner();
    let [s0, s1, s2, ..] = s;
    let dyv = input::<T>(g, dy, s0, rows * d_out)?;
    let wv = input::<T>(g, w, s1, d_out * d_in)?;
    if T::INDEX == f32::INDEX && dx.is_bf16() {
        // As in `gemm_forward`: fp32 scratch (holding dx first when accumulating), cast back.
        let o = output::<f32>(g, dx, s2, rows * d_in, if accumulate { Mode::Update } else { Mode::Write })?;
        crate::ops::linear::cuda::backward_input::<T, f32>(g, dyv, wv, Grad::new(accumulate, &mut *o.buf), sh)?;
        return o.done(g);
    }
    match dx {
        DevBuf::F32(o) => crate::ops::linear::cuda::backward_input::<T, f32>(g, dyv, wv, Grad::new(accumulate, o), sh),
        DevBuf::Bf16(o) => crate::ops::linear::cuda::backward_input::<T, bf16>(g, dyv, wv, Grad::new(accumulate, o), sh),
    }
}

impl CudaBackend {
    fn stage_crops(&mut self, st: &mut DevStaging, pixels: &[u8], crops: &[Crop]) -> Result<(), GpuError> {
        augment::check_crops(crops, pixels.len()).map_err(|e| GpuError::invalid("stage", e))?;
        let table = std::mem::size_of_val(crops);
        let total = table + pixels.len();
        if st.events.is_none() {
            let ctx = self.gpu.context();
            let event = || ctx.new_event(None).map_err(GpuError::driver("creating an event"));
            st.events = Some((event()?, event()?));
        }
        let Some((copied, consumed)) = st.events.as_ref() else {
            return Err(GpuError::invalid("staging", "no events"));
        };
        // The last copy out of the pinned memory must be done before it is rewritten (or freed).
        copied
            .synchronize()
            .map_err(GpuError::driver("waiting for the previous staging copy"))?;
        if st.host.as_ref().is_none_or(|h| h.len() < total) {
            st.host = None;
            let n = total + total / 2;
            // SAFETY: only the bytes written below are copied.
            st.host = Some(unsafe { self.gpu.context().alloc_pinned::<u8>(n) }.map_err(GpuError::driver("allocating pinned memory"))?);
        }
        let host = st
            .host
            .as_mut()
            .ok_or_else(|| GpuError::invalid("staging", "allocation vanished"))?;
        let h = host.as_mut_slice().map_err(GpuError::driver("reaching pinned memory"))?;
        for (d, c) in h[..table].chunks_exact_mut(16).zip(crops) {
            for (k, v) in [c.offset, c.width, c.height, c.flip].into_iter().enumerate() {
                d[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        h[table..total].copy_from_slice(pixels);
        // The device buffers may still be read by the last augment of this staging area.
        self.copy.wait(consumed).map_err(GpuError::driver("ordering the staging copy"))?;
        let copy = &self.copy;
        let dc = grow_on(copy, &mut st.crops, crops.len().max(1))?;
        let dp = grow_on(copy, &mut st.pixels, pixels.len().max(1))?;
        let what = || GpuError::driver("copying staged crops to the device");
        {
            let (cp, _g1) = dc.device_ptr_mut(copy);
            let (pp, _g2) = dp.device_ptr_mut(copy);
            // SAFETY: both destinations hold at least the bytes copied, the sources are pinned
            // and stay untouched until `copied` (recorded next) completes.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(cp, &h[..table], copy.cu_stream()).map_err(what())?;
                cudarc::driver::result::memcpy_htod_async(pp, &h[table..total], copy.cu_stream()).map_err(what())?;
            }
        }
        copied.record(copy).map_err(GpuError::driver("recording the staging copy"))?;
        st.staged = (crops.len(), pixels.len());
        Ok(())
    }

    fn augment_staged(&mut self, st: &DevStaging, out: &mut DevBuf, shape: &AugmentShape) -> Result<(), GpuError> {
        const OP: &str = "augment";
        if shape.batch > st.staged.0 {
            return Err(GpuError::invalid(
                OP,
                format!("a batch of {} from {} staged crops", shape.batch, st.staged.0),
            ));
        }
        let (Some(crops), Some(pixels), Some((copied, consumed))) = (st.crops.as_ref(), st.pixels.as_ref(), st.events.as_ref()) else {
            return Err(GpuError::invalid(OP, "nothing staged"));
        };
        let g = &self.gpu;
        g.stream()
            .wait(copied)
            .map_err(GpuError::driver("ordering augment after its copy"))?;
        let pixels = pixels.slice(0..st.staged.1);
        let [s0, ..] = &mut self.scratch;
        with_type!(out, T => {
            let o = output::<T>(g, out, s0, shape.out_len(), Mode::Write)?;
            augment::cuda::augment::<T>(g, g.stream(), crops, &pixels, &mut *o.buf, shape)?;
            o.done(g)?;
        });
        consumed.record(g.stream()).map_err(GpuError::driver("recording the augment"))
    }
}

impl Backend for CudaBackend {
    type Buf = DevBuf;
    type Idx = CudaIdx;
    type Staging = DevStaging;

    fn name(&self) -> String {
        format!("cuda-{} ({})", self.precision.as_str(), self.gpu.device_name())
    }

    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(e) = self.error.borrow_mut().take() {
            return Err(anyhow::Error::new(e).context(format!("GPU {} failed", self.gpu.device_name())));
        }
        // Asynchronous kernel faults surface at the next synchronisation.
        self.gpu.synchronize()?;
        Ok(())
    }

    fn alloc(&mut self, len: usize) -> DevBuf {
        self.alloc_as(len, BufRole::State)
    }
    fn alloc_as(&mut self, len: usize, role: BufRole) -> DevBuf {
        let bf16 = self.precision == Precision::Bf16 && role != BufRole::State;
        match self.zeros(len, bf16) {
            Ok(b) => b,
            Err(e) => {
                self.record(Err(e));
                // A one-element placeholder: later ops fail their length checks or are skipped;
                // `check` reports the allocation error.
                self.zeros(1, bf16).unwrap_or_else(|_| {
                    panic!(
                        "CUDA device unusable: {}",
                        self.error.borrow().as_ref().map(|e| e.to_string()).unwrap_or_default()
                    )
                })
            }
        }
    }
    fn buf_len(&self, buf: &DevBuf) -> usize {
        buf.len()
    }
    fn upload(&mut self, src: &[f32], dst: &mut DevBuf) {
        self.run(|be| {
            let n = src.len();
            if n > dst.len() {
                return Err(GpuError::invalid("upload", format!("{n} values into a buffer of {}", dst.len())));
            }
            if n == 0 {
                return Ok(());
            }
            let s = be.gpu.stream();
            let what = || format!("uploading {n} values");
            match dst {
                DevBuf::F32(d) => s.memcpy_htod(src, &mut d.slice_mut(0..n)).map_err(GpuError::driver(what())),
                DevBuf::Bf16(d) => {
                    // Rounded on the host (half's converter): half the bytes cross the bus.
                    let mut h = vec![bf16::ZERO; n];
                    half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut h[..], src);
                    s.memcpy_htod(&h, &mut d.slice_mut(0..n)).map_err(GpuError::driver(what()))
                }
            }
        });
    }
    fn upload_f64(&mut self, src: &[f64], dst: &mut DevBuf) {
        let v: Vec<f32> = src.iter().map(|&x| x as f32).collect();
        self.upload(&v, dst);
    }
    fn download(&self, src: &DevBuf, dst: &mut [f32]) {
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
            let what = || format!("downloading {n} values");
            match src {
                DevBuf::F32(b) => s.memcpy_dtoh(&b.slice(0..n), dst).map_err(GpuError::driver(what()))?,
                DevBuf::Bf16(b) => {
                    let mut h = vec![bf16::ZERO; n];
                    s.memcpy_dtoh(&b.slice(0..n), &mut h[..]).map_err(GpuError::driver(what()))?;
                    half::slice::HalfFloatSliceExt::convert_to_f32_slice(&h[..], dst);
                }
            }
            self.gpu.synchronize()
        })();
        if r.is_err() {
            dst.fill(f32::NAN);
        }
        self.record(r);
    }
    fn download_f64(&self, src: &DevBuf, dst: &mut [f64]) {
        let mut v = vec![0.0f32; dst.len()];
        self.download(src, &mut v);
        for (d, s) in dst.iter_mut().zip(v) {
            *d = s as f64;
        }
    }
    fn alloc_staging(&mut self) -> DevStaging {
        DevStaging {
            host: None,
            crops: None,
            pixels: None,
            staged: (0, 0),
            events: None,
        }
    }
    fn stage(&mut self, staging: &mut DevStaging, pixels: &[u8], crops: &[Crop]) {
        self.run(|be| be.stage_crops(staging, pixels, crops));
    }
    fn augment(&mut self, staging: &DevStaging, out: &mut DevBuf, shape: &AugmentShape) {
        self.run(|be| be.augment_staged(staging, out, shape));
    }
    fn upload_idx(&mut self, src: &[u32]) -> CudaIdx {
        CudaIdx {
            host: src.to_vec(),
            table: RefCell::new(None),
        }
    }
    fn fill(&mut self, buf: &mut DevBuf, len: usize, value: f64) {
        self.run(|be| {
            let g = &be.gpu;
            with_type!(buf, T => {
                let o = output::<T>(g, buf, &mut be.scratch[0], len, Mode::Write)?;
                tokens::cuda::fill::<T>(g, g.stream(), o.buf, len, value as f32)
            })
        });
    }
    fn copy(&mut self, src: &DevBuf, dst: &mut DevBuf, len: usize) {
        self.run(|be| {
            if len > src.len() || len > dst.len() {
                return Err(GpuError::invalid(
                    "copy",
                    format!("{len} values between buffers of {} and {}", src.len(), dst.len()),
                ));
            }
            // Same types: a device copy; else a cast.
            match src {
                DevBuf::F32(s) => f32::cast_to(&be.gpu, s, dst, len),
                DevBuf::Bf16(s) => bf16::cast_to(&be.gpu, s, dst, len),
            }
        });
    }
    fn axpby(&mut self, a: f64, y: &mut DevBuf, b: f64, x: &DevBuf, len: usize) {
        self.run(|be| {
            let (g, [s0, s1, ..]) = (&be.gpu, &mut be.scratch);
            // Both types native (tok_axpby_<Y>_<X>): no casts.
            with_type!(y, Y => with_type!(x, X => {
                let o = output::<Y>(g, y, s0, len, Mode::Update)?;
                let xv = input::<X>(g, x, s1, len)?;
                tokens::cuda::axpby::<Y, X>(g, g.stream(), a as f32, o.buf, b as f32, xv, len)
            }))
        });
    }

    fn patchify(&mut self, images: &DevBuf, out: &mut DevBuf, sh: &PatchShape) {
        self.run(|be| {
            let (g, [s0, s1, ..]) = (&be.gpu, &mut be.scratch);
            let n = sh.image_len();
            // The kernel is a permutation: run it in the output's type.
            with_type!(out, T => {
                let i = input::<T>(g, images, s0, n)?;
                let o = output::<T>(g, out, s1, n, Mode::Write)?;
                tokens::cuda::patchify::<T>(g, g.stream(), i, o.buf, sh)
            })
        });
    }
    fn embed_tokens(&mut self, patches: &DevBuf, cls: &DevBuf, pos: &DevBuf, x: &mut DevBuf, sh: &TokenShape) {
        self.run(|be| {
            let (g, [s0, s1, s2, ..]) = (&be.gpu, &mut be.scratch);
            let c = input::<f32>(g, cls, s0, sh.dim)?;
            let p = input::<f32>(g, pos, s1, (1 + sh.num_patches) * sh.dim)?;
            let o = output::<f32>(g, x, s2, sh.len(), Mode::Update)?;
            with_type!(patches, T => {
                let pa = T::of(patches).ok_or_else(|| GpuError::invalid("embed_tokens", "patch type"))?;
                tokens::cuda::embed_tokens::<T>(g, g.stream(), pa, c, p, &mut *o.buf, sh)
            })?;
            o.done(g)
        });
    }
    fn set_prompts(&mut self, prompts: &DevBuf, layer: usize, x: &mut DevBuf, sh: &TokenShape) {
        self.run(|be| {
            let (g, [s0, s1, ..]) = (&be.gpu, &mut be.scratch);
            let p = input::<f32>(g, prompts, s0, prompts.len())?;
            let o = output::<f32>(g, x, s1, sh.len(), Mode::Update)?;
            tokens::cuda::set_prompts(g, g.stream(), p, layer, &mut *o.buf, sh)?;
            o.done(g)
        });
    }
    fn prompt_grad(&mut self, dx: &mut DevBuf, dprompts: &mut DevBuf, layer: usize, sh: &TokenShape, zero_rows: bool) {
        self.run(|be| {
            let (g, [s0, s1, ..]) = (&be.gpu, &mut be.scratch);
            let x = output::<f32>(g, dx, s0, sh.len(), Mode::Update)?;
            let len = dprompts.len();
            let p = output::<f32>(g, dprompts, s1, len, Mode::Update)?;
            tokens::cuda::prompt_grad(g, g.stream(), &mut *x.buf, &mut *p.buf, layer, sh, zero_rows)?;
            x.done(g)?;
            p.done(g)
        });
    }
    fn copy_tokens(&mut self, src: &DevBuf, dst: &mut DevBuf, c: &TokenCopy) {
        self.run(|be| {
            let (g, [s0, s1, ..]) = (&be.gpu, &mut be.scratch);
            let per_token = c.batch * c.dim;
            with_type!(dst, T => {
                let sv = input::<T>(g, src, s0, per_token * c.src.tokens)?;
                let o = output::<T>(g, dst, s1, per_token * c.dst.tokens, Mode::Update)?;
                tokens::cuda::copy_tokens::<T>(g, g.stream(), sv, o.buf, c)
            })
        });
    }
    fn residual(&mut self, res: Residual<'_, DevBuf>, out: &mut DevBuf, sh: Rows) {
        let (Residual { x, f, ls }, Rows { rows, dim }) = (res, sh);
        self.run(|be| {
            let (g, [s0, s1, s2, ..]) = (&be.gpu, &mut be.scratch);
            let n = rows * dim;
            let xv = input::<f32>(g, x, s0, n)?;
            let lv = ls.map(|l| input::<f32>(g, l, s1, dim)).transpose()?;
            let o = output::<f32>(g, out, s2, n, Mode::Write)?;
            with_type!(f, T => {
                let fv = T::of(f).ok_or_else(|| GpuError::invalid("residual", "branch type"))?;
                tokens::cuda::residual::<T>(g, g.stream(), xv, fv, lv.map(|l| l as &dyn DevicePtr<f32>), &mut *o.buf, sh)
            })?;
            o.done(g)
        });
    }
    fn mul_cols(&mut self, src: &DevBuf, v: &DevBuf, out: &mut DevBuf, sh: Rows) {
        let Rows { rows, dim } = sh;
        self.run(|be| {
            let (g, [s0, s1, ..]) = (&be.gpu, &mut be.scratch);
            let sv = input::<f32>(g, src, s0, rows * dim)?;
            let vv = input::<f32>(g, v, s1, dim)?;
            with_type!(out, T => {
                let o = T::of_mut(out).map_err(|_| GpuError::invalid("mul_cols", "output type"))?;
                tokens::cuda::mul_cols::<T>(g, g.stream(), sv, vv, o, sh)
            })
        });
    }

    fn linear_forward(&mut self, x: &DevBuf, w: &DevBuf, bias: Option<&DevBuf>, y: &mut DevBuf, sh: &LinearShape) {
        self.run(|be| {
            // One operand type for both: bf16 (tensor-core bf16 GEMM) when either is stored in
            // bf16, else fp32 (TF32).
            if x.is_bf16() || w.is_bf16() {
                gemm_forward::<bf16>(&be.gpu, &mut be.scratch, x, w, bias, y, sh)
            } else {
                gemm_forward::<f32>(&be.gpu, &mut be.scratch, x, w, bias, y, sh)
            }
        });
    }
    fn linear_backward_input(&mut self, dy: &DevBuf, w: &DevBuf, dx: Grad<&mut DevBuf>, sh: &LinearShape) {
        self.run(|be| {
            if dy.is_bf16() || w.is_bf16() {
                gemm_backward_input::<bf16>(&be.gpu, &mut be.scratch, dy, w, dx, sh)
            } else {
                gemm_backward_input::<f32>(&be.gpu, &mut be.scratch, dy, w, dx, sh)
            }
        });
    }
    fn residual_layernorm_forward(
        &mut self,
        res: Residual<'_, DevBuf>,
        out: &mut DevBuf,
        norm: Norm<&DevBuf>,
        y: &mut DevBuf,
        stats: NormStats<&mut DevBuf>,
        sh: &LayerNormShape,
    ) {
        let (Residual { x, f, ls }, Norm { gamma, beta }, NormStats { mean, rstd }) = (res, norm, stats);
        let &LayerNormShape { rows, dim, .. } = sh;
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, s6, s7, ..]) = (&be.gpu, &mut be.scratch);
            let n = rows * dim;
            // One pass: the residual stream (fp32) read and written, the branch output in its
            // own storage, y always bf16.
            let xv = input::<f32>(g, x, s0, n)?;
            let lv = ls.map(|l| input::<f32>(g, l, s1, dim)).transpose()?;
            let (gm, bt) = (input::<f32>(g, gamma, s2, dim)?, input::<f32>(g, beta, s3, dim)?);
            let o = output::<f32>(g, out, s4, n, Mode::Write)?;
            let yb = output::<bf16>(g, y, s5, n, Mode::Write)?;
            let m = output::<f32>(g, mean, s6, rows, Mode::Write)?;
            let r = output::<f32>(g, rstd, s7, rows, Mode::Write)?;
            with_type!(f, F => {
                let fv = F::of(f).ok_or_else(|| GpuError::invalid("residual + layernorm", "branch type"))?;
                let ls = lv.map(|l| l as &dyn DevicePtr<f32>);
                let norm = Norm { gamma: gm, beta: bt };
                let stats = NormStats { mean: &mut *m.buf, rstd: &mut *r.buf };
                layernorm::cuda::residual_forward::<F>(g, g.stream(), xv, fv, ls, &mut *o.buf, norm, &mut *yb.buf, stats, sh)
            })?;
            o.done(g)?;
            yb.done(g)?;
            m.done(g)?;
            r.done(g)
        });
    }
    fn layernorm_forward(&mut self, x: &DevBuf, norm: Norm<&DevBuf>, y: &mut DevBuf, stats: NormStats<&mut DevBuf>, sh: &LayerNormShape) {
        let (Norm { gamma, beta }, NormStats { mean, rstd }) = (norm, stats);
        let &LayerNormShape { rows, dim, .. } = sh;
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, ..]) = (&be.gpu, &mut be.scratch);
            let n = rows * dim;
            let (gm, bt) = (input::<f32>(g, gamma, s1, dim)?, input::<f32>(g, beta, s2, dim)?);
            let yb = output::<bf16>(g, y, s3, n, Mode::Write)?;
            let m = output::<f32>(g, mean, s4, rows, Mode::Write)?;
            let r = output::<f32>(g, rstd, s5, rows, Mode::Write)?;
            // x in its own storage (the fp32 residual stream is read directly, no cast pass).
            with_type!(x, S => {
                let xv = input::<S>(g, x, s0, n)?;
                let norm = Norm { gamma: gm, beta: bt };
                let stats = NormStats { mean: &mut *m.buf, rstd: &mut *r.buf };
                layernorm::cuda::forward::<S>(g, g.stream(), xv, norm, &mut *yb.buf, stats, sh)
            })?;
            yb.done(g)?;
            m.done(g)?;
            r.done(g)
        });
    }
    fn layernorm_backward(
        &mut self,
        dy: &DevBuf,
        x: &DevBuf,
        norm: Norm<&DevBuf>,
        stats: NormStats<&DevBuf>,
        dx: Grad<&mut DevBuf>,
        sh: &LayerNormShape,
    ) {
        let (gamma, NormStats { mean, rstd }) = (norm.gamma, stats);
        let &LayerNormShape { rows, dim, .. } = sh;
        let accumulate = dx.accumulates();
        let dx = dx.into_inner();
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, ..]) = (&be.gpu, &mut be.scratch);
            let n = rows * dim;
            let dyb = input::<bf16>(g, dy, s0, n)?;
            let gm = input::<f32>(g, gamma, s2, dim)?;
            let (m, r) = (input::<f32>(g, mean, s3, rows)?, input::<f32>(g, rstd, s4, rows)?);
            // The kernel's x and dx share dx's storage: an fp32 dx (the residual stream's
            // gradient) is written and accumulated in fp32 by the kernel itself.
            with_type!(dx, S => {
                let xv = input::<S>(g, x, s1, n)?;
                let o = output::<S>(g, dx, s5, n, if accumulate { Mode::Add } else { Mode::Write })?;
                let acc = accumulate && o.direct();
                let stats = NormStats { mean: m, rstd: r };
                layernorm::cuda::backward::<S>(g, g.stream(), dyb, xv, gm, stats, Grad::new(acc, &mut *o.buf), sh)?;
                o.done(g)
            })
        });
    }
    fn gelu_forward(&mut self, x: &DevBuf, bias: Option<&DevBuf>, y: &mut DevBuf, sh: Rows) {
        self.run(|be| {
            let (g, [s0, s1, s2, ..]) = (&be.gpu, &mut be.scratch);
            let len = sh.rows * sh.dim;
            let xb = input::<bf16>(g, x, s0, len)?;
            let b = bias.map(|b| input::<f32>(g, b, s2, sh.dim)).transpose()?;
            let o = output::<bf16>(g, y, s1, len, Mode::Write)?;
            gelu::cuda::forward(g, g.stream(), xb, b.map(|b| b as &dyn DevicePtr<f32>), &mut *o.buf, sh)?;
            o.done(g)
        });
    }
    fn gelu_backward(&mut self, x: &DevBuf, bias: Option<&DevBuf>, d: &mut DevBuf, sh: Rows) {
        self.run(|be| {
            let (g, [s0, s1, s2, ..]) = (&be.gpu, &mut be.scratch);
            let len = sh.rows * sh.dim;
            let xb = input::<bf16>(g, x, s0, len)?;
            let b = bias.map(|b| input::<f32>(g, b, s2, sh.dim)).transpose()?;
            let o = output::<bf16>(g, d, s1, len, Mode::Update)?;
            gelu::cuda::backward_in_place(g, g.stream(), xb, b.map(|b| b as &dyn DevicePtr<f32>), &mut *o.buf, sh)?;
            o.done(g)
        });
    }

    fn attention_forward(&mut self, qkv: &DevBuf, out: &mut DevBuf, lse: &mut DevBuf, shape: &AttnShape) {
        self.run(|be| {
            let (g, [s0, s1, s2, ..]) = (&be.gpu, &mut be.scratch);
            let full = shape.batch * shape.tokens * 3 * shape.dim();
            let nq = shape.batch * shape.q_len * shape.dim();
            let l = output::<f32>(g, lse, s2, shape.batch * shape.heads * shape.q_len, Mode::Write)?;
            if attention::cuda::HEAD_DIMS.contains(&shape.head_dim) {
                let q = input::<bf16>(g, qkv, s0, full)?;
                let o = output::<bf16>(g, out, s1, nq, Mode::Write)?;
                let tiles = be
                    .attn_fwd
                    .filter(|t| t.head_dim == shape.head_dim)
                    .or_else(|| attention::fwd_tiles(shape.head_dim));
                let tiles = tiles.expect("a fused head dim has a forward");
                attention::cuda::forward_with(g, g.stream(), q, &mut *o.buf, &mut *l.buf, shape, &tiles)?;
                o.done(g)?;
            } else {
                let q = input::<f32>(g, qkv, s0, full)?;
                let o = output::<f32>(g, out, s1, nq, Mode::Write)?;
                attention::cuda::plain_forward(g, g.stream(), q, &mut *o.buf, &mut *l.buf, shape)?;
                o.done(g)?;
            }
            l.done(g)
        });
    }
    fn attention_backward(&mut self, qkv: &DevBuf, out: &DevBuf, lse: &DevBuf, dout: &DevBuf, dqkv: &mut DevBuf, shape: &AttnShape) {
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, ..]) = (&be.gpu, &mut be.scratch);
            let full = shape.batch * shape.tokens * 3 * shape.dim();
            let nq = shape.batch * shape.q_len * shape.dim();
            let l = input::<f32>(g, lse, s2, shape.batch * shape.heads * shape.q_len)?;
            if attention::cuda::HEAD_DIMS.contains(&shape.head_dim) {
                let q = input::<bf16>(g, qkv, s0, full)?;
                let o = input::<bf16>(g, out, s1, nq)?;
                let go = input::<bf16>(g, dout, s3, nq)?;
                let d = output::<bf16>(g, dqkv, s4, full, Mode::Write)?;
                let sc = grow(g, &mut s5.f, attention::cuda::backward_scratch_len(shape))?;
                let tiles = be
                    .attn_bwd
                    .filter(|t| t.head_dim == shape.head_dim)
                    .or_else(|| attention::bwd_tiles(shape.head_dim));
                let tiles = tiles.expect("a fused head dim has a backward");
                attention::cuda::backward_with(g, g.stream(), q, o, l, go, &mut *d.buf, sc, shape, &tiles)?;
                d.done(g)
            } else {
                let q = input::<f32>(g, qkv, s0, full)?;
                let o = input::<f32>(g, out, s1, nq)?;
                let go = input::<f32>(g, dout, s3, nq)?;
                let d = output::<f32>(g, dqkv, s4, full, Mode::Write)?;
                attention::cuda::plain_backward(g, g.stream(), q, o, l, go, &mut *d.buf, shape)?;
                d.done(g)
            }
        });
    }

    fn adapter_forward(&mut self, z: &DevBuf, params: AdapterParams<&DevBuf>, u: &mut DevBuf, out: &mut DevBuf, shape: &AdapterShape) {
        let AdapterParams { w1, b1, w2, b2 } = params;
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, s6, ..]) = (&be.gpu, &mut be.scratch);
            let (p, d, r) = (shape.tokens, shape.dim, shape.rank);
            let n = shape.batch * p * d;
            let zb = input::<bf16>(g, z, s0, n)?;
            let (w1v, b1v) = (input::<f32>(g, w1, s1, p * r * d)?, input::<f32>(g, b1, s2, p * r)?);
            let (w2v, b2v) = (input::<f32>(g, w2, s3, p * d * r)?, input::<f32>(g, b2, s4, p * d)?);
            let uo = output::<f32>(g, u, s5, shape.batch * p * r, Mode::Write)?;
            let o = output::<bf16>(g, out, s6, n, Mode::Write)?;
            head::cuda::adapter_forward(
                g,
                g.stream(),
                zb,
                w1v,
                b1v,
                w2v,
                b2v,
                &mut *uo.buf,
                &mut *o.buf,
                shape,
                be.head_kernels,
            )?;
            uo.done(g)?;
            o.done(g)
        });
    }
    fn adapter_backward(
        &mut self,
        dout: &DevBuf,
        z: &DevBuf,
        u: &DevBuf,
        params: AdapterParams<&DevBuf>,
        dz: &mut DevBuf,
        grads: AdapterParams<&mut DevBuf>,
        shape: &AdapterShape,
    ) {
        let (w1, w2) = (params.w1, params.w2);
        let AdapterParams {
            w1: dw1,
            b1: db1,
            w2: dw2,
            b2: db2,
        } = grads;
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, ..], ws) = (&be.gpu, &mut be.scratch, &mut be.head_ws);
            let (p, d, r) = (shape.tokens, shape.dim, shape.rank);
            let n = shape.batch * p * d;
            let gb = input::<bf16>(g, dout, s0, n)?;
            let zb = input::<bf16>(g, z, s1, n)?;
            let uv = input::<f32>(g, u, s2, shape.batch * p * r)?;
            let (w1v, w2v) = (input::<f32>(g, w1, s3, p * r * d)?, input::<f32>(g, w2, s4, p * d * r)?);
            // The kernel accumulates dz (bf16); an fp32 dz gets it added in fp32.
            let dzo = output::<bf16>(g, dz, s5, n, Mode::AddZeroed)?;
            let o1 = output::<f32>(g, dw1, s6, p * r * d, Mode::Write)?;
            let o2 = output::<f32>(g, db1, s7, p * r, Mode::Write)?;
            let o3 = output::<f32>(g, dw2, s8, p * d * r, Mode::Write)?;
            let o4 = output::<f32>(g, db2, s9, p * d, Mode::Write)?;
            head::cuda::adapter_backward(
                g,
                g.stream(),
                ws,
                gb,
                zb,
                uv,
                w1v,
                w2v,
                &mut *dzo.buf,
                &mut *o1.buf,
                &mut *o2.buf,
                &mut *o3.buf,
                &mut *o4.buf,
                shape,
                be.head_kernels,
            )?;
            for o in [o1, o2, o3, o4] {
                o.done(g)?;
            }
            dzo.done(g)
        });
    }
    fn moe_forward(
        &mut self,
        inputs: HeadInputs<&DevBuf>,
        params: BranchParams<&DevBuf>,
        tables: &GateTables<CudaIdx>,
        logits: BranchLogits<&mut DevBuf>,
        saved: MoeSaved<&mut DevBuf>,
        shape: &MoeShape,
    ) {
        let (HeadInputs { z, adapted }, BranchParams { gate, w, c }) = (inputs, params);
        let (BranchLogits { y, m }, MoeSaved { q, r }) = (logits, saved);
        let (tok, grow_) = (&tables.token, &tables.gate_row);
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, s6, s7, s8, ..]) = (&be.gpu, &mut be.scratch);
            let (n, d, k) = (shape.batch * shape.tokens * shape.dim, shape.dim, shape.labels);
            let (bk, bek) = (shape.batch * k, shape.batch * shape.experts * k);
            let zb = input::<bf16>(g, z, s0, n)?;
            let ab = input::<bf16>(g, adapted, s1, n)?;
            let gv = input::<f32>(g, gate, s2, shape.gate_rows * d)?;
            let (wv, cv) = (input::<f32>(g, w, s3, k * d)?, input::<f32>(g, c, s4, k)?);
            let (yo, mo) = (output::<f32>(g, y, s5, bk, Mode::Write)?, output::<f32>(g, m, s6, bk, Mode::Write)?);
            let (qo, ro) = (
                output::<f32>(g, q, s7, bek, Mode::Write)?,
                output::<f32>(g, r, s8, bek, Mode::Write)?,
            );
            let (tt, gt) = (tok.table(g, shape.tokens)?, grow_.table(g, shape.gate_rows)?);
            head::cuda::moe_forward(
                g,
                g.stream(),
                zb,
                ab,
                gv,
                wv,
                cv,
                &tt,
                &gt,
                &mut *yo.buf,
                &mut *mo.buf,
                &mut *qo.buf,
                &mut *ro.buf,
                shape,
                be.head_kernels,
            )?;
            for o in [yo, mo, qo, ro] {
                o.done(g)?;
            }
            Ok(())
        });
    }
    fn moe_backward(
        &mut self,
        dlogits: BranchLogits<&DevBuf>,
        inputs: HeadInputs<&DevBuf>,
        params: BranchParams<&DevBuf>,
        tables: &GateTables<CudaIdx>,
        saved: MoeSaved<&DevBuf>,
        dinputs: HeadInputs<&mut DevBuf>,
        grads: BranchParams<&mut DevBuf>,
        shape: &MoeShape,
    ) {
        let (BranchLogits { y: dy, m: dm }, HeadInputs { z, adapted }) = (dlogits, inputs);
        let ((gate, w), MoeSaved { q, r }) = ((params.gate, params.w), saved);
        let HeadInputs { z: dz, adapted: dadapted } = dinputs;
        let BranchParams { gate: dgate, w: dw, c: dc } = grads;
        let (tok, grow_) = (&tables.token, &tables.gate_row);
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, ..], ws) = (&be.gpu, &mut be.scratch, &mut be.head_ws);
            let (n, d, k) = (shape.batch * shape.tokens * shape.dim, shape.dim, shape.labels);
            let (bk, bek) = (shape.batch * k, shape.batch * shape.experts * k);
            let (dyv, dmv) = (input::<f32>(g, dy, s0, bk)?, input::<f32>(g, dm, s1, bk)?);
            let zb = input::<bf16>(g, z, s2, n)?;
            let ab = input::<bf16>(g, adapted, s3, n)?;
            let (gv, wv) = (input::<f32>(g, gate, s4, shape.gate_rows * d)?, input::<f32>(g, w, s5, k * d)?);
            let (qv, rv) = (input::<f32>(g, q, s6, bek)?, input::<f32>(g, r, s7, bek)?);
            // The kernel accumulates dz and dadapted (bf16); fp32 ones get them added in fp32.
            let dzo = output::<bf16>(g, dz, s8, n, Mode::AddZeroed)?;
            let dao = output::<bf16>(g, dadapted, s9, n, Mode::AddZeroed)?;
            let go = output::<f32>(g, dgate, s10, shape.gate_rows * d, Mode::Write)?;
            let wo = output::<f32>(g, dw, s11, k * d, Mode::Write)?;
            let co = output::<f32>(g, dc, s12, k, Mode::Write)?;
            let (tt, gt) = (tok.table(g, shape.tokens)?, grow_.table(g, shape.gate_rows)?);
            head::cuda::moe_backward(
                g,
                g.stream(),
                ws,
                dyv,
                dmv,
                zb,
                ab,
                gv,
                wv,
                &tt,
                &gt,
                qv,
                rv,
                &mut *dzo.buf,
                &mut *dao.buf,
                &mut *go.buf,
                &mut *wo.buf,
                &mut *co.buf,
                shape,
                be.head_kernels,
            )?;
            for o in [dzo, dao] {
                o.done(g)?;
            }
            for o in [go, wo, co] {
                o.done(g)?;
            }
            Ok(())
        });
    }
    fn vpt_head_forward(&mut self, z: &DevBuf, params: VptParams<&DevBuf>, zbar: &mut DevBuf, y: &mut DevBuf, shape: &VptHeadShape) {
        let VptParams { w, c } = params;
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, ..]) = (&be.gpu, &mut be.scratch);
            let (d, k) = (shape.dim, shape.labels);
            let zb = input::<bf16>(g, z, s0, shape.batch * shape.tokens * d)?;
            let (wv, cv) = (input::<f32>(g, w, s1, k * d)?, input::<f32>(g, c, s2, k)?);
            let zo = output::<f32>(g, zbar, s3, shape.batch * d, Mode::Write)?;
            let yo = output::<f32>(g, y, s4, shape.batch * k, Mode::Write)?;
            head::cuda::vpt_forward(g, g.stream(), zb, wv, cv, &mut *zo.buf, &mut *yo.buf, shape)?;
            zo.done(g)?;
            yo.done(g)
        });
    }
    fn vpt_head_backward(
        &mut self,
        dy: &DevBuf,
        zbar: &DevBuf,
        params: VptParams<&DevBuf>,
        dz: &mut DevBuf,
        grads: VptParams<&mut DevBuf>,
        shape: &VptHeadShape,
    ) {
        let (w, VptParams { w: dw, c: dc }) = (params.w, grads);
        self.run(|be| {
            let (g, [s0, s1, s2, s3, s4, s5, ..], ws) = (&be.gpu, &mut be.scratch, &mut be.head_ws);
            let (d, k) = (shape.dim, shape.labels);
            let dyv = input::<f32>(g, dy, s0, shape.batch * k)?;
            let zv = input::<f32>(g, zbar, s1, shape.batch * d)?;
            let wv = input::<f32>(g, w, s2, k * d)?;
            let dzo = output::<bf16>(g, dz, s3, shape.batch * shape.tokens * d, Mode::Write)?;
            let (wo, co) = (
                output::<f32>(g, dw, s4, k * d, Mode::Write)?,
                output::<f32>(g, dc, s5, k, Mode::Write)?,
            );
            head::cuda::vpt_backward(g, g.stream(), ws, dyv, zv, wv, &mut *dzo.buf, &mut *wo.buf, &mut *co.buf, shape)?;
            dzo.done(g)?;
            wo.done(g)?;
            co.done(g)
        });
    }

    fn asl(&mut self, logits: &DevBuf, targets: &DevBuf, len: usize, cfg: &AslConfig, scale: f64, grad: Option<&mut DevBuf>) -> f64 {
        let mut out = f64::NAN;
        self.run(|be| {
            let (g, [s0, s1, s2, ..]) = (&be.gpu, &mut be.scratch);
            let (l, t) = (input::<f32>(g, logits, s0, len)?, input::<f32>(g, targets, s1, len)?);
            let mut go = grad.map(|b| output::<f32>(g, b, s2, len, Mode::Write)).transpose()?;
            let gd = go.as_mut().map(|o| &mut *o.buf as &mut dyn DevicePtrMut<f32>);
            asl::cuda::forward_backward(g, g.stream(), &mut be.asl_ws, l, t, cfg, scale as f32, gd, &mut be.loss, len)?;
            if let Some(o) = go {
                o.done(g)?;
            }
            let mut host = [0.0f32];
            g.stream()
                .memcpy_dtoh(&be.loss, &mut host[..])
                .map_err(GpuError::driver("reading the loss"))?;
            g.synchronize()?;
            out = host[0] as f64;
            Ok(())
        });
        out
    }
    fn asl_terms(
        &mut self,
        terms: &mut [(&DevBuf, Option<&mut DevBuf>)],
        targets: &DevBuf,
        len: usize,
        cfg: &AslConfig,
        scale: f64,
    ) -> f64 {
        let all_f32 = !targets.is_bf16() && terms.iter().all(|(l, gr)| !l.is_bf16() && gr.as_ref().is_none_or(|b| !b.is_bf16()));
        if !all_f32 {
            // Casts per term (not a training step's layout: logits and loss terms are fp32 State).
            let mut total = 0.0;
            for (logits, grad) in terms.iter_mut() {
                total += self.asl(logits, targets, len, cfg, scale, grad.as_deref_mut());
            }
            return total;
        }
        let mut out = 0.0;
        self.run(|be| {
            let g = &be.gpu;
            let t = f32::of(targets).ok_or_else(|| GpuError::invalid("asl", "targets type"))?;
            // One launch per MAX_TERMS terms (the training loss has at most four), each
            // writing `loss`, which is read back (one host synchronisation per launch; the
            // training step uses `asl_terms_into`, which does not wait).
            for chunk in terms.chunks_mut(asl::cuda::MAX_TERMS) {
                let mut ts = Vec::with_capacity(chunk.len());
                for (l, gr) in chunk.iter_mut() {
                    let logits = f32::of(l).ok_or_else(|| GpuError::invalid("asl", "logits type"))?;
                    let grad = match gr.as_deref_mut() {
                        Some(b) => {
                            Some(f32::of_mut(b).map_err(|_| GpuError::invalid("asl", "gradient type"))? as &mut dyn DevicePtrMut<f32>)
                        }
                        None => None,
                    };
                    ts.push(asl::cuda::AslTerm {
                        logits: logits as &dyn DevicePtr<f32>,
                        grad,
                    });
                }
                asl::cuda::forward_backward_terms(g, g.stream(), &mut be.asl_ws, &mut ts, t, cfg, scale as f32, &mut be.loss, len)?;
                let mut host = [0.0f32];
                g.stream()
                    .memcpy_dtoh(&be.loss, &mut host[..])
                    .map_err(GpuError::driver("reading the loss"))?;
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
    fn asl_terms_into(
        &mut self,
        terms: &mut [(&DevBuf, Option<&mut DevBuf>)],
        targets: &DevBuf,
        len: usize,
        cfg: &AslConfig,
        scale: f64,
        loss: &mut DevBuf,
    ) {
        let all_f32 =
            !targets.is_bf16() && !loss.is_bf16() && terms.iter().all(|(l, gr)| !l.is_bf16() && gr.as_ref().is_none_or(|b| !b.is_bf16()));
        if !all_f32 || terms.is_empty() || terms.len() > asl::cuda::MAX_TERMS {
            // Not a training step's layout (its logits, gradients and loss are fp32 State, one
            // to four terms): computed now, with a host read (no terms: a loss of 0, as the
            // trait's default writes; the kernel launcher rejects an empty term list).
            let total = self.asl_terms(terms, targets, len, cfg, scale);
            self.upload_f64(&[total], loss);
            return;
        }
        self.run(|be| {
            let g = &be.gpu;
            let t = f32::of(targets).ok_or_else(|| GpuError::invalid("asl", "targets type"))?;
            let mut ts = Vec::with_capacity(terms.len());
            for (l, gr) in terms.iter_mut() {
                let logits = f32::of(l).ok_or_else(|| GpuError::invalid("asl", "logits type"))?;
                let grad = match gr.as_deref_mut() {
                    Some(b) => Some(f32::of_mut(b).map_err(|_| GpuError::invalid("asl", "gradient type"))? as &mut dyn DevicePtrMut<f32>),
                    None => None,
                };
                ts.push(asl::cuda::AslTerm {
                    logits: logits as &dyn DevicePtr<f32>,
                    grad,
                });
            }
            let out = f32::of_mut(loss).map_err(|_| GpuError::invalid("asl", "loss type"))?;
            // One launch; the loss stays on the device (no synchronisation).
            asl::cuda::forward_backward_terms(g, g.stream(), &mut be.asl_ws, &mut ts, t, cfg, scale as f32, out, len)
        });
    }
    fn adamw(
        &mut self,
        params: &mut [DevBuf],
        grads: &[DevBuf],
        m: &mut [DevBuf],
        v: &mut [DevBuf],
        step: u64,
        lr: f64,
        cfg: &AdamWConfig,
        guard: Option<&DevBuf>,
    ) {
        self.run(|be| {
            const OP: &str = "adamw";
            if grads.len() != params.len() || m.len() != params.len() || v.len() != params.len() {
                return Err(GpuError::invalid(OP, "params, grads and moments differ in count"));
            }
            // Parameters, gradients and moments are State, fp32 in both precisions: every
            // tensor in one launch (adamw_multi_f32).
            let gd = match guard {
                Some(b) => Some(f32::of(b).ok_or_else(|| GpuError::invalid(OP, "the guard must be fp32"))? as &dyn DevicePtr<f32>),
                None => None,
            };
            let mut ts = Vec::with_capacity(params.len());
            for (((p, gr), mi), vi) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
                let n = p.len();
                let (DevBuf::F32(p), DevBuf::F32(gr), DevBuf::F32(mi), DevBuf::F32(vi)) = (p, gr, mi, vi) else {
                    return Err(GpuError::invalid(OP, "parameters, gradients and moments must be stored in fp32"));
                };
                ts.push(adamw::cuda::AdamWTensor {
                    params: p,
                    grads: gr,
                    m: mi,
                    v: vi,
                    n,
                });
            }
            adamw::cuda::step_many(&be.gpu, be.gpu.stream(), &mut ts, step, lr, cfg, gd)
        });
    }
}
