//! [`GpuContext`]: one device, one stream, the embedded kernel modules (each loaded on first
//! use) and a cuBLAS handle (made on the first GEMM).

use super::blas::Blas;
use super::{GpuError, Kernel, FATBINS, GENCODE};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A CUDA device ready to run this crate's kernels: the context, one stream that every launcher
/// and cuBLAS call of this context uses, the modules of `kernels/*.cu` (each loaded the first
/// time one of its kernels runs) and a cuBLAS handle (made on the first GEMM; when libcublas is
/// missing only the GEMMs fail, kernels still run).
///
/// [`GpuContext::new`] opens a device of its own, with cudarc's cross-stream event tracking
/// off (all work is ordered by the one stream). [`GpuContext::from_stream`] adopts a caller's
/// cudarc context and stream as they are. A caller that passes another stream to a launcher
/// must order it against this one itself.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::cast;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (major, minor) = gpu.compute_capability();
/// println!("{}: sm_{major}{minor}, {} SMs", gpu.device_name(), gpu.sm_count());
/// // Buffers, launchers and the stream they run on.
/// let x = gpu.upload(&[0.5f32, -1.25, 3.0])?;
/// let mut y = gpu.zeros::<bf16>(3)?;
/// cast::cuda::f32_to_bf16(&gpu, gpu.stream(), &x, &mut y, 3)?;
/// assert_eq!(gpu.download(&y)?, [bf16::from_f32(0.5), bf16::from_f32(-1.25), bf16::from_f32(3.0)]);
/// assert_eq!(gpu.loaded_modules(), ["cast"]); // loaded by its first launch
/// # Ok(()) }
/// ```
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<Kernel, CudaFunction>>,
    blas: OnceLock<Result<Blas, String>>,
    /// fp32 GEMMs on tensor cores (TF32 inputs, fp32 accumulation); off unless asked for.
    tf32: std::sync::atomic::AtomicBool,
    name: String,
    cc: (i32, i32),
    sm_count: u32,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.cc)
            .field("sm_count", &self.sm_count)
            .field("cublas", &self.blas.get().map(|b| b.is_ok()))
            .finish()
    }
}

/// Runs a closure that calls into cudarc's lazily loaded libraries, turning a panic (cudarc
/// panics when a library or symbol cannot be loaded) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, GpuError>) -> Result<T, GpuError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(GpuError::Init(format!("{what}: {msg}")))
        }
    }
}

impl GpuContext {
    /// Opens device `ordinal`: checks that libcuda loads and the device exists and makes a
    /// stream. Kernel modules load on first use, cuBLAS on the first GEMM.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, GpuError};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert!(gpu.loaded_modules().is_empty() && !gpu.cublas_ready()); // both come on first use
    /// // A device that is not there is an error that says so.
    /// assert!(matches!(GpuContext::new(1000), Err(GpuError::NoDevice { ordinal: 1000, .. })));
    /// # Ok(()) }
    /// ```
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: only tries to dlopen libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        guarded("opening the CUDA device", || Self::open(ordinal))
    }

    /// Whether libcuda can be loaded here (no device needed, no panic).
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// if GpuContext::driver_present() {
    ///     println!("libcuda loads: GpuContext::new can look for a device");
    /// } else {
    ///     println!("no CUDA driver here: run on the CPU");
    /// }
    /// ```
    pub fn driver_present() -> bool {
        // SAFETY: only tries to dlopen libcuda.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }

    fn open(ordinal: usize) -> Result<Self, GpuError> {
        let count = match CudaContext::device_count() {
            Ok(c) => c,
            // A driver without a GPU fails cuInit with "no device".
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => return Err(GpuError::NoDevice { ordinal, count: 0 }),
            Err(e) => return Err(GpuError::driver("initialising the driver (cuInit)")(e)),
        };
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::NoDevice {
                ordinal,
                count: count.max(0) as usize,
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(GpuError::driver(format!("creating a context on device {ordinal}")))?;
        // One stream does all the work, so cudarc's per-buffer events (a record and a wait
        // per kernel argument, for cross-stream safety) would only add launch overhead.
        // SAFETY: no buffer exists yet; work on other streams must be synchronised by the
        // caller (see the type's docs).
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(GpuError::driver("reading the device name"))?;
        let cc = ctx
            .compute_capability()
            .map_err(GpuError::driver("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(GpuError::driver("reading the multiprocessor count"))? as u32;
        let stream = ctx.new_stream().map_err(GpuError::driver("creating a stream"))?;
        Ok(Self::with(ctx, stream, name, cc, sm_count))
    }

    /// Adopts a caller's cudarc stream (and its context): every launcher and GEMM of this
    /// context then runs on that stream, ordered with the caller's own work on it, with the
    /// context's event tracking left as the caller set it. Kernel modules load on first use,
    /// cuBLAS on the first GEMM.
    ///
    /// ```
    /// use mlvpt::gpu::cudarc::driver::CudaContext;
    /// use mlvpt::gpu::{GpuContext, GpuError};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # if !GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let ctx = CudaContext::new(0)?; // the caller's own cudarc context
    /// let stream = ctx.new_stream()?;
    /// let gpu = GpuContext::from_stream(stream.clone())?;
    /// let x = stream.clone_htod(&[1.0f32, 2.0])?; // the caller's buffer, used by mlvpt's kernels as it is
    /// let mut y = stream.alloc_zeros::<mlvpt::gpu::bf16>(2)?;
    /// mlvpt::ops::cast::cuda::f32_to_bf16(&gpu, gpu.stream(), &x, &mut y, 2)?;
    /// assert_eq!(stream.clone_dtoh(&y)?[1].to_f32(), 2.0);
    /// # Ok(()) }
    /// ```
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self, GpuError> {
        guarded("adopting a CUDA stream", || {
            let ctx = stream.context().clone();
            let name = ctx.name().map_err(GpuError::driver("reading the device name"))?;
            let cc = ctx
                .compute_capability()
                .map_err(GpuError::driver("reading the compute capability"))?;
            let sm_count = ctx
                .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(GpuError::driver("reading the multiprocessor count"))? as u32;
            Ok(Self::with(ctx, stream, name, cc, sm_count))
        })
    }

    fn with(ctx: Arc<CudaContext>, stream: Arc<CudaStream>, name: String, cc: (i32, i32), sm_count: u32) -> Self {
        Self {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            tf32: Default::default(),
            name,
            cc,
            sm_count,
        }
    }

    /// The cudarc context.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let ctx = gpu.context(); // cudarc's context, e.g. to make another stream
    /// assert_eq!(ctx.ordinal(), 0);
    /// assert!(std::sync::Arc::ptr_eq(ctx, gpu.stream().context()));
    /// # Ok(()) }
    /// ```
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream this context's work goes to.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// use mlvpt::ops::tokens;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let mut x = gpu.zeros::<f32>(4)?;
    /// // Launchers take the stream to queue on; the context's own orders everything.
    /// tokens::cuda::fill::<f32>(&gpu, gpu.stream(), &mut x, 4, 2.5)?;
    /// assert_eq!(gpu.download(&x)?, [2.5; 4]);
    /// # Ok(()) }
    /// ```
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert!(!gpu.device_name().is_empty());
    /// println!("running on {}", gpu.device_name());
    /// # Ok(()) }
    /// ```
    pub fn device_name(&self) -> &str {
        &self.name
    }
    /// Whether this is the project's virtual CUDA device (tools/vgpu: PTX interpreted on the
    /// CPU, whose name starts with "vGPU"): its results prove behaviour, never speed.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// if gpu.is_virtual() {
    ///     println!("{}: timings mean nothing here", gpu.device_name());
    /// }
    /// assert_eq!(gpu.is_virtual(), gpu.device_name().starts_with("vGPU"));
    /// # Ok(()) }
    /// ```
    pub fn is_virtual(&self) -> bool {
        self.name.starts_with("vGPU")
    }
    /// (major, minor) compute capability.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let (major, minor) = gpu.compute_capability();
    /// assert!(major >= 1 && minor >= 0);
    /// println!("sm_{major}{minor}");
    /// # Ok(()) }
    /// ```
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    /// Number of streaming multiprocessors (sizes grid-stride launches).
    ///
    /// ```
    /// use mlvpt::gpu::{launch, GpuContext};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert!(gpu.sm_count() >= 1);
    /// // A grid-stride launch uses at most one wave of 8 blocks per SM.
    /// assert!(launch::grid_stride_blocks(&gpu, 1 << 30, 256) <= 8 * gpu.sm_count());
    /// # Ok(()) }
    /// ```
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Lets fp32 GEMMs round their inputs to TF32 (10-bit mantissa, still fp32 accumulation)
    /// to run on tensor cores; bf16 GEMMs are unaffected.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert!(!gpu.tf32()); // off unless asked for
    /// gpu.allow_tf32(true); // what the CUDA backend does for its fp32 GEMMs
    /// assert!(gpu.tf32());
    /// # Ok(()) }
    /// ```
    pub fn allow_tf32(&self, on: bool) {
        self.tf32.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    /// Whether [`Self::allow_tf32`] is on.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// gpu.allow_tf32(true);
    /// assert!(gpu.tf32());
    /// gpu.allow_tf32(false);
    /// assert!(!gpu.tf32());
    /// # Ok(()) }
    /// ```
    pub fn tf32(&self) -> bool {
        self.tf32.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cuBLAS handle (made on first use, on this context's stream), or why there is none.
    pub(crate) fn blas(&self) -> Result<&Blas, GpuError> {
        let blas = self.blas.get_or_init(|| {
            // SAFETY: only tries to dlopen libcublas.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(GpuError::NoCublas.to_string());
            }
            guarded("creating a cuBLAS handle", || {
                Blas::new(self.stream.clone()).map_err(GpuError::cublas("creating a handle"))
            })
            .map_err(|e| e.to_string())
        });
        blas.as_ref().map_err(|msg| GpuError::Init(msg.clone()))
    }

    /// The loaded function of a kernel ([`super::kernels`] names every compiled one), loading
    /// its module the first time.
    ///
    /// ```
    /// use mlvpt::gpu::{kernels, GpuContext};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let f = gpu.kernel(kernels::gelu::GELU_BIAS_FWD_BF16)?; // loads kernels/gelu.cu's module
    /// assert_eq!(gpu.loaded_modules(), ["gelu"]);
    /// let _again = gpu.kernel(kernels::gelu::GELU_BIAS_BWD_BF16)?; // same module, no second load
    /// assert_eq!(gpu.loaded_modules(), ["gelu"]);
    /// # drop(f);
    /// # Ok(()) }
    /// ```
    pub fn kernel(&self, kernel: Kernel) -> Result<CudaFunction, GpuError> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&kernel) {
            return Ok(f.clone());
        }
        let module = self.module(kernel.module)?;
        let f = module.load_function(kernel.name).map_err(|_| GpuError::NoKernel {
            module: kernel.module.into(),
            function: kernel.name.into(),
        })?;
        cache.insert(kernel, f.clone());
        Ok(f)
    }

    /// Embedded module `name` (the stem of `kernels/<name>.cu`), loaded on first use.
    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>, GpuError> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(name) {
            return Ok(m.clone());
        }
        let fatbin = FATBINS
            .iter()
            .find(|(m, _)| *m == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| GpuError::NoKernel {
                module: name.into(),
                function: "(module not embedded)".into(),
            })?;
        let m = self
            .ctx
            .load_module(Ptx::from_binary(fatbin.to_vec()))
            .map_err(|source| GpuError::ModuleLoad {
                module: name.to_string(),
                device: self.name.clone(),
                cc: format!("{}.{}", self.cc.0, self.cc.1),
                gencode: GENCODE.to_string(),
                source,
            })?;
        modules.insert(name, m.clone());
        Ok(m)
    }

    /// The modules loaded so far (each loads with the first launch of one of its kernels).
    ///
    /// ```
    /// use mlvpt::gpu::{kernels, GpuContext};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert!(gpu.loaded_modules().is_empty());
    /// gpu.kernel(kernels::tokens::TOK_FILL_F32)?;
    /// gpu.kernel(kernels::cast::CAST_F32_BF16)?;
    /// assert_eq!(gpu.loaded_modules(), ["cast", "tokens"]); // sorted
    /// # Ok(()) }
    /// ```
    pub fn loaded_modules(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.modules.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        v.sort();
        v
    }
    /// Whether a cuBLAS handle exists yet (one is made on the first GEMM).
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// assert!(!gpu.cublas_ready());
    /// let (x, w) = (gpu.upload(&[1.0f32, 2.0])?, gpu.upload(&[3.0f32, 4.0])?);
    /// let mut y = gpu.zeros::<f32>(1)?;
    /// let shape = mlvpt::ops::linear::LinearShape { rows: 1, d_in: 2, d_out: 1 };
    /// mlvpt::ops::linear::cuda::forward::<f32, f32>(&gpu, &x, &w, None, &mut y, &shape)?; // the first GEMM makes the handle
    /// assert!(gpu.cublas_ready());
    /// assert_eq!(gpu.download(&y)?, [11.0]);
    /// # Ok(()) }
    /// ```
    pub fn cublas_ready(&self) -> bool {
        self.blas.get().is_some_and(|b| b.is_ok())
    }

    /// Loads every embedded module now (a cold start's cost up front, or a check that the
    /// fatbins load on this device).
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, FATBINS};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// gpu.load_all()?; // every embedded fatbin loads on this device
    /// assert_eq!(gpu.loaded_modules().len(), FATBINS.len());
    /// # Ok(()) }
    /// ```
    pub fn load_all(&self) -> Result<(), GpuError> {
        for (name, _) in FATBINS {
            self.module(name)?;
        }
        Ok(())
    }

    /// Copies a host slice to a new device buffer (on this context's stream). An empty slice
    /// is an error: CUDA cannot allocate 0 bytes (cuMemAlloc returns CUDA_ERROR_INVALID_VALUE).
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, GpuError};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let x = gpu.upload(&[1u32, 2, 3])?;
    /// assert_eq!(gpu.download(&x)?, [1, 2, 3]);
    /// assert!(matches!(gpu.upload::<f32>(&[]), Err(GpuError::Invalid { op: "upload", .. })));
    /// # Ok(()) }
    /// ```
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
        if host.is_empty() {
            return Err(GpuError::invalid(
                "upload",
                "an empty slice: CUDA cannot allocate 0 bytes; allocate at least one element".to_string(),
            ));
        }
        self.stream
            .clone_htod(host)
            .map_err(GpuError::driver(format!("uploading {} elements", host.len())))
    }
    /// Copies a device buffer back to the host (waits for the stream).
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let x = gpu.upload(&[1.0f32, 2.0, 3.0, 4.0])?;
    /// assert_eq!(gpu.download(&x)?, [1.0, 2.0, 3.0, 4.0]);
    /// assert_eq!(gpu.download(&x.slice(1..3))?, [2.0, 3.0]); // any slice or view
    /// # Ok(()) }
    /// ```
    pub fn download<T: DeviceRepr, S: DevicePtr<T>>(&self, dev: &S) -> Result<Vec<T>, GpuError> {
        self.stream
            .clone_dtoh(dev)
            .map_err(GpuError::driver(format!("downloading {} elements", dev.len())))
    }
    /// Copies a host slice into an existing device buffer of the same length.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let mut x = gpu.zeros::<f32>(4)?;
    /// gpu.write(&[5.0, 6.0], &mut x.slice_mut(2..))?;
    /// assert_eq!(gpu.download(&x)?, [0.0, 0.0, 5.0, 6.0]);
    /// assert!(gpu.write(&[1.0f32; 3], &mut x).is_err()); // lengths must match
    /// # Ok(()) }
    /// ```
    pub fn write<T: DeviceRepr, D: DevicePtrMut<T>>(&self, host: &[T], dev: &mut D) -> Result<(), GpuError> {
        if host.len() != dev.len() {
            return Err(GpuError::invalid(
                "write",
                format!("host has {} elements, device {}", host.len(), dev.len()),
            ));
        }
        self.stream
            .memcpy_htod(host, dev)
            .map_err(GpuError::driver(format!("uploading {} elements", host.len())))
    }
    /// A zero-filled device buffer of `len` elements (`len` 0 is an error, as in [`Self::upload`]).
    ///
    /// ```
    /// use mlvpt::gpu::{bf16, GpuContext};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let z = gpu.zeros::<bf16>(3)?;
    /// assert_eq!(gpu.download(&z)?, [bf16::ZERO; 3]);
    /// assert!(gpu.zeros::<f32>(0).is_err()); // CUDA cannot allocate 0 bytes
    /// # Ok(()) }
    /// ```
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>, GpuError> {
        if len == 0 {
            return Err(GpuError::invalid(
                "zeros",
                "0 elements: CUDA cannot allocate 0 bytes; allocate at least one element".to_string(),
            ));
        }
        self.stream
            .alloc_zeros(len)
            .map_err(GpuError::driver(format!("allocating {len} elements")))
    }
    /// Waits until everything queued on the stream has run (reports asynchronous kernel errors).
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// use mlvpt::ops::tokens;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let mut x = gpu.zeros::<f32>(1024)?;
    /// tokens::cuda::fill::<f32>(&gpu, gpu.stream(), &mut x, 1024, 1.0)?; // queued
    /// gpu.synchronize()?; // done (and any error of the launch reported)
    /// # Ok(()) }
    /// ```
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(GpuError::driver("waiting for the stream"))
    }
}
