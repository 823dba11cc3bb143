//! Launcher of `kernels/augment.cu` (the twin of [`super::cpu::augment`]): checks what the host
//! can see (the shape, the buffers' lengths) and returns a [`GpuError`] instead of launching
//! out of bounds. The crop table itself is in device memory, so the kernel checks each crop
//! against the pixel buffer and writes NaN for a bad one instead of reading outside it.

use super::{AugmentShape, Crop, Layout};
use crate::contract::augment::AugmentParams;
use crate::gpu::kernels::augment as k;
use crate::gpu::launch::{check_len, BLOCK};
use crate::gpu::{CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use cudarc::driver::{LaunchConfig, PushKernelArg};

pub use crate::gpu::launch::Storage;

/// Largest output side the kernel takes: it indexes an image's `S * S` pixels in 32 bits.
///
/// ```
/// use mlvpt::ops::augment::cuda::MAX_SIZE;
/// assert_eq!(MAX_SIZE, 65535);
/// assert!((MAX_SIZE as u64).pow(2) < 1 << 32); // S * S fits a u32
/// ```
pub const MAX_SIZE: usize = u16::MAX as usize;

/// Twin of [`super::cpu::augment`]: crop `b` of the table `crops` (its bytes in `pixels`)
/// resized to `shape.size` squared, mirrored if its `flip` is 1, normalized, into `out` (stored
/// as `T`, in `shape.layout`). A crop that is empty, has `flip > 1` or does not fit in `pixels`
/// gives NaN for its image (the others are written as usual).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::augment::{cpu, cuda, AugmentShape, Crop, Layout};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // Two crops in one buffer: 9 x 7 pixels, then 3 x 5 mirrored; each to 4 x 4, in 2 x 2 patches.
/// let crops = [Crop { offset: 0, width: 9, height: 7, flip: 0 }, Crop { offset: 3 * 9 * 7, width: 3, height: 5, flip: 1 }];
/// let pixels: Vec<u8> = (0..3 * (9 * 7 + 3 * 5)).map(|i| (i * 37 % 256) as u8).collect();
/// let shape = AugmentShape { batch: 2, size: 4, layout: Layout::Patches { patch: 2 }, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
/// let mut out = gpu.zeros::<bf16>(shape.out_len())?;
/// cuda::augment::<bf16>(&gpu, gpu.stream(), &gpu.upload(&crops)?, &gpu.upload(&pixels)?, &mut out, &shape)?;
/// let mut want = vec![0.0f32; shape.out_len()];
/// cpu::augment(&pixels, &crops, &mut want, &shape); // the CPU twin, in f32
/// for (got, want) in gpu.download(&out)?.iter().zip(&want) {
///     assert!((got.to_f32() - want).abs() <= 1e-5 + want.abs() / 256.0, "{got} vs {want}"); // bf16 rounding
/// }
/// // The table is checked against the buffers' lengths before anything is launched.
/// assert!(cuda::augment::<bf16>(&gpu, gpu.stream(), &gpu.upload(&crops[..1])?, &gpu.upload(&pixels)?, &mut out, &shape).is_err());
/// # Ok(()) }
/// ```
pub fn augment<T: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    crops: &impl DevicePtr<Crop>,
    pixels: &impl DevicePtr<u8>,
    out: &mut impl DevicePtrMut<T>,
    shape: &AugmentShape,
) -> Result<(), GpuError> {
    const OP: &str = "augment";
    shape.check_shape().map_err(|m| GpuError::invalid(OP, m))?;
    if shape.size > MAX_SIZE {
        return Err(GpuError::invalid(
            OP,
            format!(
                "output size {} exceeds {MAX_SIZE} (the kernel indexes S * S pixels in 32 bits)",
                shape.size
            ),
        ));
    }
    let batch = u32::try_from(shape.batch).map_err(|_| GpuError::invalid(OP, format!("batch = {} exceeds 32 bits", shape.batch)))?;
    check_len(OP, "crops", crops, shape.batch)?;
    check_len(OP, "out", out, shape.out_len())?;
    if batch == 0 {
        return Ok(());
    }
    let f = gpu.kernel(T::pick([k::AUGMENT_F32, k::AUGMENT_BF16]))?;
    let (scale, bias) = shape.scale_bias();
    let (cp, _g1) = crops.device_ptr(stream);
    let (pp, _g2) = pixels.device_ptr(stream);
    let (op, _g3) = out.device_ptr_mut(stream);
    let arg = AugmentParams {
        crops: cp,
        pixels: pp,
        out: op,
        pixels_len: pixels.len() as u64,
        batch,
        size: shape.size as u32,
        patch: match shape.layout {
            Layout::Images => 0,
            Layout::Patches { patch } => patch as u32, // divides size (checked), so < 2^16
        },
        scale,
        bias,
    };
    // One thread per output pixel (S^2 < 2^32, so fewer than 2^24 blocks); the images along y,
    // looped over in the kernel past the grid's 65535.
    let pixels_per_image = (shape.size * shape.size) as u64;
    let cfg = LaunchConfig {
        grid_dim: (pixels_per_image.div_ceil(BLOCK as u64) as u32, batch.min(65535), 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&arg);
    // SAFETY: `crops` holds `batch` entries and `out` `out_len` values of T (checked above); the
    // kernel reads a crop's bytes only after checking them against `pixels_len`, the length of
    // `pixels`; AugmentParams is the kernel's one argument (src/contract.rs).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver("launching augment"))?;
    Ok(())
}
