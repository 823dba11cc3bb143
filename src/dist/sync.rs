//! The gradient exchange of a data-parallel step ([`GradSync`], called by the trainer between
//! the backward and AdamW). Each rank's gradients and loss are the mean over its share of the
//! batch; the exchange makes them, on every rank, the mean over the whole batch: the sum over
//! ranks of (images x mean), divided by all the images. The trainable tensors travel as one
//! flat buffer with the loss and the image count at its end (one collective per step).
//!
//! - [`HostSync`]: through the host and the control links (rank 0 sums in rank order, in
//!   f64). Any backend; what the CPU backend uses, and the reference in tests.
//! - `NcclSync` (feature `cuda`): one NCCL all-reduce of a device buffer on the backend's
//!   stream, waited for while watching NCCL's asynchronous errors, the control links and a
//!   timeout; on any of them the communicator is aborted and the step fails.

use super::control::Control;
use crate::backend::Backend;
use crate::train::GradSync;
use anyhow::Result;

/// [`GradSync`] through the host and the control links.
pub struct HostSync<'a> {
    pub control: &'a Control,
}

impl<B: Backend> GradSync<B> for HostSync<'_> {
    fn sync(&mut self, be: &mut B, grads: &mut [B::Buf], lens: &[usize], loss: &mut B::Buf, images: usize) -> Result<usize> {
        let total: usize = lens.iter().sum();
        let mut flat = vec![0f32; total + 1];
        let mut off = 0;
        for (g, &n) in grads.iter().zip(lens) {
            be.download(g, &mut flat[off..off + n]);
            off += n;
        }
        let mut l = [0f64];
        be.download_f64(loss, &mut l);
        be.check()?;
        flat[total] = l[0] as f32;
        let (mean, count) = self.control.weighted_mean(&flat, images as f64)?;
        let mut off = 0;
        for (g, &n) in grads.iter_mut().zip(lens) {
            be.upload(&mean[off..off + n], g);
            off += n;
        }
        be.upload_f64(&[mean[total] as f64], loss);
        Ok(count.round() as usize)
    }
}

#[cfg(feature = "cuda")]
pub use nccl::{Nccl, NcclSync};

#[cfg(feature = "cuda")]
mod nccl {
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};
    use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
    use cudarc::nccl::sys;

    use super::Control;
    use crate::backend::{Backend, CudaBackend, DevBuf};
    use crate::gpu::{GpuContext, GpuError};
    use crate::train::GradSync;

    fn nccl_error(r: sys::ncclResult_t) -> String {
        // SAFETY: ncclGetErrorString returns a static C string for any result code.
        let s = unsafe { sys::ncclGetErrorString(r) };
        if s.is_null() {
            format!("{r:?}")
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            format!("{} ({r:?})", unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy())
        }
    }

    fn check(r: sys::ncclResult_t, what: &str) -> Result<()> {
        if r == sys::ncclResult_t::ncclSuccess {
            Ok(())
        } else {
            bail!("NCCL {what}: {}", nccl_error(r))
        }
    }

    /// An NCCL communicator of one rank.
    pub struct Nccl {
        comm: sys::ncclComm_t,
        /// Kept alive until the communicator is destroyed.
        _ctx: std::sync::Arc<cudarc::driver::CudaContext>,
        rank: usize,
        world: usize,
        aborted: bool,
    }

    impl Nccl {
        /// Whether libnccl opens (libnccl.so / libnccl.so.2 on the library path).
        pub fn available() -> bool {
            // SAFETY: only tries to open the library.
            unsafe { sys::is_culib_present() }
        }

        /// An error saying how to install NCCL unless [`Nccl::available`].
        pub fn require() -> Result<()> {
            if !Self::available() {
                bail!(
                    "data-parallel training on CUDA needs NCCL, and libnccl.so.2 was not found on the library path \
                     (install the system package libnccl2, or `pip install nvidia-nccl-cu12` and add its \
                     nvidia/nccl/lib folder to LD_LIBRARY_PATH, or name the file with MLVPT_NCCL_LIB)"
                );
            }
            Ok(())
        }

        /// A new unique id (rank 0), as bytes for the start-up exchange.
        pub fn unique_id() -> Result<[u8; 128]> {
            Self::require()?;
            let mut id = std::mem::MaybeUninit::<sys::ncclUniqueId>::uninit();
            // SAFETY: NCCL writes the whole id.
            let id = unsafe {
                check(sys::ncclGetUniqueId(id.as_mut_ptr()), "creating the unique id")?;
                id.assume_init()
            };
            Ok(id.internal.map(|c| c as u8))
        }

        /// Joins the communicator of `id` as `rank` of `world` on `gpu`'s device (blocks until
        /// every rank joined).
        pub fn init(gpu: &GpuContext, id: &[u8; 128], rank: usize, world: usize) -> Result<Self> {
            Self::require()?;
            gpu.context().bind_to_thread().context("NCCL: making the CUDA context current")?;
            let id = sys::ncclUniqueId {
                internal: id.map(|b| b as std::ffi::c_char),
            };
            let mut comm = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
            // SAFETY: NCCL writes the communicator on success.
            let comm = unsafe {
                check(
                    sys::ncclCommInitRank(comm.as_mut_ptr(), world as i32, id, rank as i32),
                    &format!("joining the communicator as rank {rank} of {world}"),
                )?;
                comm.assume_init()
            };
            Ok(Self {
                comm,
                _ctx: gpu.context().clone(),
                rank,
                world,
                aborted: false,
            })
        }

        pub fn rank(&self) -> usize {
            self.rank
        }
        pub fn world(&self) -> usize {
            self.world
        }

        /// Queues an in-place sum of `buf[..len]` over the ranks on `stream`.
        pub fn all_reduce_sum(&self, buf: &mut CudaSlice<f32>, len: usize, stream: &CudaStream) -> Result<()> {
            let (p, _guard) = buf.device_ptr_mut(stream);
            // SAFETY: `buf` holds at least `len` floats and stays alive (the guard orders its
            // reuse after the stream's work).
            let r = unsafe {
                sys::ncclAllReduce(
                    p as *const std::ffi::c_void,
                    p as *mut std::ffi::c_void,
                    len,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    stream.cu_stream() as _,
                )
            };
            check(r, "all-reduce")
        }

        /// Waits for `stream`'s work, failing (and aborting the communicator) on an NCCL
        /// error, a failed peer (`control`) or after `timeout`.
        pub fn wait(&mut self, stream: &CudaStream, control: &Control, timeout: Duration) -> Result<()> {
            let done = stream.record_event(None).map_err(GpuError::driver("recording the all-reduce"))?;
            let start = Instant::now();
            while !done.is_complete() {
                let mut async_err = sys::ncclResult_t::ncclSuccess;
                // SAFETY: a live communicator.
                let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
                let why = if r != sys::ncclResult_t::ncclSuccess {
                    Some(format!("NCCL cannot report its state: {}", nccl_error(r)))
                } else if async_err != sys::ncclResult_t::ncclSuccess && async_err != sys::ncclResult_t::ncclInProgress {
                    Some(format!("NCCL failed: {}", nccl_error(async_err)))
                } else if let Some(f) = control.failure() {
                    Some(f)
                } else if start.elapsed() >= timeout {
                    Some(format!(
                        "the gradient all-reduce did not complete within {} s (--dist-timeout): a rank hangs",
                        timeout.as_secs()
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    self.abort();
                    bail!("{why}");
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(())
        }

        /// Aborts the communicator (its pending work ends).
        pub fn abort(&mut self) {
            if !self.aborted {
                self.aborted = true;
                // SAFETY: a live communicator, not used afterwards.
                unsafe {
                    sys::ncclCommAbort(self.comm);
                }
            }
        }
    }

    impl Drop for Nccl {
        fn drop(&mut self) {
            if !self.aborted {
                self.aborted = true;
                // SAFETY: a live communicator, not used afterwards; no work is pending (every
                // collective was waited for).
                unsafe {
                    sys::ncclCommDestroy(self.comm);
                }
            }
        }
    }

    /// [`GradSync`] by one NCCL all-reduce on the device.
    pub struct NcclSync<'a> {
        pub nccl: Nccl,
        pub control: &'a Control,
        pub timeout: Duration,
        flat: Option<CudaSlice<f32>>,
    }

    impl<'a> NcclSync<'a> {
        pub fn new(nccl: Nccl, control: &'a Control, timeout: Duration) -> Self {
            Self {
                nccl,
                control,
                timeout,
                flat: None,
            }
        }
    }

    fn f32_of(b: &DevBuf) -> Result<&CudaSlice<f32>> {
        match b {
            DevBuf::F32(s) => Ok(s),
            DevBuf::Bf16(_) => bail!("gradients and the loss must be stored in fp32"),
        }
    }

    impl GradSync<CudaBackend> for NcclSync<'_> {
        fn sync(&mut self, be: &mut CudaBackend, grads: &mut [DevBuf], lens: &[usize], loss: &mut DevBuf, images: usize) -> Result<usize> {
            use crate::ops::tokens::cuda::axpby;
            be.check()?;
            self.control.check()?;
            let g = be.gpu();
            let s = g.stream();
            let total: usize = lens.iter().sum();
            let len = total + 2;
            if self.flat.as_ref().is_none_or(|f| f.len() < len) {
                self.flat = Some(g.zeros(len)?);
            }
            let flat = self.flat.as_mut().expect("allocated above");
            s.memset_zeros(flat).map_err(GpuError::driver("zeroing the gradient buffer"))?;
            let w = images as f32;
            let mut off = 0;
            for (gr, &n) in grads.iter().zip(lens) {
                axpby::<f32, f32>(g, s, 0.0, &mut flat.slice_mut(off..off + n), w, f32_of(gr)?, n)?;
                off += n;
            }
            axpby::<f32, f32>(g, s, 0.0, &mut flat.slice_mut(total..total + 1), w, f32_of(loss)?, 1)?;
            s.memcpy_htod(&[w], &mut flat.slice_mut(total + 1..total + 2))
                .map_err(GpuError::driver("writing the image count"))?;
            self.nccl.all_reduce_sum(flat, len, s)?;
            self.nccl.wait(s, self.control, self.timeout)?;
            let mut count = [0f32];
            s.memcpy_dtoh(&flat.slice(total + 1..total + 2), &mut count)
                .map_err(GpuError::driver("reading the image count"))?;
            g.synchronize()?;
            let count = count[0];
            if count <= 0.0 {
                return Ok(0);
            }
            let inv = 1.0 / count;
            let mut off = 0;
            for (gr, &n) in grads.iter_mut().zip(lens) {
                let DevBuf::F32(gs) = gr else {
                    bail!("gradients must be stored in fp32")
                };
                axpby::<f32, f32>(g, s, 0.0, gs, inv, &flat.slice(off..off + n), n)?;
                off += n;
            }
            let DevBuf::F32(ls) = loss else {
                bail!("the loss must be stored in fp32")
            };
            axpby::<f32, f32>(g, s, 0.0, ls, inv, &flat.slice(total..total + 1), 1)?;
            be.check()?;
            Ok(count.round() as usize)
        }
    }

    /// Visible CUDA devices (0 when the driver does not open).
    pub fn device_count() -> usize {
        if !GpuContext::driver_present() {
            return 0;
        }
        cudarc::driver::CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
    }
}

#[cfg(feature = "cuda")]
pub use nccl::device_count;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::dist::control::tests::group;
    use crate::dist::shard;
    use crate::train::bench::tests::tiny;
    use crate::train::bench::RandomProblem;
    use crate::train::Shard;
    use std::time::Duration;

    /// Three ranks stepping on their parts of a batch (`n` images, two steps) end with the
    /// parameters of one trainer stepping on the whole batch, identical on every rank; with
    /// `n < 3` a rank has no image.
    fn ranks_step_as_one(n: usize) {
        let cfg = tiny();
        let p = RandomProblem::new(&cfg, n, 3);
        let mut one = p.trainer(CpuBackend::<f32>::new(), &cfg).unwrap();
        let mut losses = Vec::new();
        for _ in 0..2 {
            losses.push(one.step(&p.images, &p.targets, 1e-2).unwrap());
        }
        let want = one.params();
        let (il, k) = (cfg.vit.image_len(), cfg.labels);
        let cs = group(3, Duration::from_secs(30));
        let handles: Vec<_> = cs
            .into_iter()
            .map(|c| {
                let (cfg, images, targets) = (cfg.clone(), p.images.clone(), p.targets.clone());
                let p = RandomProblem::new(&cfg, shard::per_rank(n, 3), 3);
                std::thread::spawn(move || {
                    let mut tr = p.trainer(CpuBackend::<f32>::new(), &cfg).unwrap();
                    let r = shard::split(n, c.rank(), 3);
                    let mut sync = HostSync { control: &c };
                    let mut losses = Vec::new();
                    for _ in 0..2 {
                        let shard = match r.is_empty() {
                            true => Shard::Empty,
                            false => Shard::Images(&images[r.start * il..r.end * il]),
                        };
                        let t = &targets[r.start * k..r.end * k];
                        losses.push(tr.step_shard(shard, t, 1e-2, &mut sync).unwrap().unwrap());
                    }
                    c.finish();
                    (tr.params(), losses)
                })
            })
            .collect();
        let got: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (params, l) in &got {
            assert_eq!(params, &got[0].0, "ranks differ");
            for (a, b) in l.iter().zip(&losses) {
                assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
            }
        }
        for (a, b) in got[0].0.tensors.iter().zip(&want.tensors) {
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!((x - y).abs() <= 1e-5 + 1e-4 * y.abs(), "{}: {x} vs {y}", a.name);
            }
        }
    }

    #[test]
    fn ranks_step_as_one_process_on_uneven_parts() {
        ranks_step_as_one(5);
    }

    #[test]
    fn a_rank_without_images_takes_part() {
        ranks_step_as_one(2);
    }
}
