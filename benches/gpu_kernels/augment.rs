//! Part of the `gpu_kernels` bench: input augmentation (`kernels/augment.cu`,
//! `ops::augment::cuda`) at the training shape, batch 64 cropped to 224 x 224 and written as the
//! 16 x 16 patch rows in bf16, in bytes moved per second: the crops' uint8 pixels read once and
//! the output written once (the 16-byte crop table per image is left out). Two crop sizes: about
//! what the cache's stored images give (180 x 160, upsampled) and what JPEG-sized sources give
//! (400 x 300, downsampled: about twice the taps per axis). Filter: `cargo bench --features
//! cuda --bench gpu_kernels -- augment`.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::{bf16, GpuContext};
use mlvpt::ops::augment::{self, cuda, AugmentShape, Layout};

use super::{filled, timed};

const B: usize = 64;
const SIZE: usize = 224;
const SHAPE: AugmentShape = AugmentShape {
    batch: B,
    size: SIZE,
    layout: Layout::Patches { patch: 16 },
    mean: [0.485, 0.456, 0.406],
    std: [0.229, 0.224, 0.225],
};

/// Every bench of this op.
pub fn bench(c: &mut Criterion, gpu: &GpuContext) {
    let s = gpu.stream();
    let mut g = c.benchmark_group("augment");
    let mut out = filled(gpu, SHAPE.out_len(), bf16::ZERO);
    for (what, w, h) in [("cache-like", 180u32, 160u32), ("JPEG-like", 400, 300)] {
        // B crops packed one after another, every other one mirrored; pixels a fixed hash.
        let (crops, bytes) = augment::pack((0..B).map(|b| (w, h, b % 2 == 1)));
        let pixels: Vec<u8> = (0..bytes).map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let (cd, pd) = (gpu.upload(&crops).unwrap(), gpu.upload(&pixels).unwrap());
        g.throughput(Throughput::Bytes((bytes + SHAPE.out_len() * 2) as u64));
        g.bench_function(format!("bf16 patches 64x224x224 p16 from {w}x{h} ({what})"), |b| {
            b.iter_custom(|it| timed(gpu, it, || cuda::augment::<bf16>(gpu, s, &cd, &pd, &mut out, &SHAPE)))
        });
    }
    g.finish();
}
