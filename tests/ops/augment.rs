//! Input augmentation (`src/ops/augment`): the CPU twin against a direct f64 definition of the
//! resize at awkward sizes (crops of one pixel, thin strips, larger and smaller than the output),
//! its layouts, flip and exact cases, and the table checks; on a device, `kernels/augment.cu`
//! against the twin in fp32 and bf16 storage, both layouts, a bad crop's NaN, and the
//! launcher's checks.

use mlvpt::ops::augment::{cpu, AugmentShape, Crop, Layout};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

fn shape(batch: usize, size: usize, layout: Layout) -> AugmentShape {
    AugmentShape {
        batch,
        size,
        layout,
        mean: MEAN,
        std: STD,
    }
}

/// Crops of the given `(width, height, flip)` packed into one buffer of random bytes, with a
/// random gap before each and some bytes after the last (so no crop ends the buffer by luck).
fn staged(rng: &mut ChaCha8Rng, sizes: &[(u32, u32, u32)]) -> (Vec<u8>, Vec<Crop>) {
    let mut crops = Vec::new();
    let mut len = 0u32;
    for &(width, height, flip) in sizes {
        let offset = len + rng.random_range(0..7);
        crops.push(Crop {
            offset,
            width,
            height,
            flip,
        });
        len = offset + 3 * width * height;
    }
    let pixels = (0..len + 5).map(|_| rng.random()).collect();
    (pixels, crops)
}

/// The resize by its definition (src/ops/augment/mod.rs), in f64: output sample `o` of an axis
/// of `n` samples resized to `out` sits at `c = (o + 0.5) n / out` and weighs every source
/// sample `i` by `max(0, 1 - |i + 0.5 - c| / max(n / out, 1))`, normalized. (The weights that
/// are not zero are exactly the taps of the module docs' range.)
fn weights(o: usize, n: usize, out: usize) -> Vec<(usize, f64)> {
    let scale = n as f64 / out as f64;
    let support = scale.max(1.0);
    let center = (o as f64 + 0.5) * scale;
    let w: Vec<(usize, f64)> = (0..n)
        .map(|i| (i, (1.0 - (i as f64 + 0.5 - center).abs() / support).max(0.0)))
        .filter(|&(_, v)| v > 0.0)
        .collect();
    let sum: f64 = w.iter().map(|&(_, v)| v).sum();
    w.into_iter().map(|(i, v)| (i, v / sum)).collect()
}

/// Every output value `(b, c, y, x)` by the definition, normalized as `(v / 255 - mean) / std`,
/// at `shape.out_index`.
fn direct(pixels: &[u8], crops: &[Crop], s: &AugmentShape) -> Vec<f64> {
    let n = s.size;
    let mut out = vec![f64::NAN; s.out_len()];
    for (b, cr) in crops[..s.batch].iter().enumerate() {
        let (w, h) = (cr.width as usize, cr.height as usize);
        let px = |x: usize, y: usize, c: usize| pixels[cr.offset as usize + 3 * (y * w + x) + c] as f64;
        for y in 0..n {
            let wy = weights(y, h, n);
            for x in 0..n {
                let wx = weights(if cr.flip == 1 { n - 1 - x } else { x }, w, n);
                for c in 0..3 {
                    let mut v = 0.0;
                    for &(sy, vy) in &wy {
                        for &(sx, vx) in &wx {
                            v += vy * vx * px(sx, sy, c);
                        }
                    }
                    out[s.out_index(b, c, y, x)] = (v / 255.0 - MEAN[c] as f64) / STD[c] as f64;
                }
            }
        }
    }
    out
}

/// A test case: the output size, its layout, and each crop's (width, height, flip).
type Case = (usize, Layout, Vec<(u32, u32, u32)>);

/// The awkward cases: one-pixel crops, strips thinner than a tap and longer than many, crops
/// larger and smaller than the output, the output's own size, sizes that are multiples of
/// nothing.
fn cases() -> Vec<Case> {
    vec![
        (
            22,
            Layout::Patches { patch: 11 },
            vec![(1, 1, 0), (7, 300, 1), (333, 250, 0), (22, 22, 0), (5, 40, 1)],
        ),
        (
            14,
            Layout::Images,
            vec![(300, 7, 0), (13, 15, 1), (14, 14, 0), (1, 1, 1), (60, 3, 0)],
        ),
        (15, Layout::Patches { patch: 5 }, vec![(15, 16, 1), (2, 3, 0), (100, 100, 1)]),
        (1, Layout::Images, vec![(9, 4, 1), (1, 1, 0)]),
    ]
}

#[test]
fn twin_matches_the_direct_definition() {
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    for (size, layout, sizes) in cases() {
        let s = shape(sizes.len(), size, layout);
        let (pixels, crops) = staged(&mut rng, &sizes);
        let mut got = vec![f32::NAN; s.out_len()];
        cpu::augment(&pixels, &crops, &mut got, &s);
        let want = direct(&pixels, &crops, &s);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            // f32 weights and sums of at most ~30 taps per axis on 0..=255, then / 57 or so.
            assert!(
                (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "size {size} {layout:?} crops {sizes:?}: [{i}] twin {g}, definition {w}"
            );
        }
        // The f64 twin is the same function to f64 rounding (its weights still round to f32).
        let mut got64 = vec![f64::NAN; s.out_len()];
        cpu::augment(&pixels, &crops, &mut got64, &s);
        for (i, (&g, &w)) in got64.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "f64 twin [{i}]: {g} vs {w}");
        }
    }
}

#[test]
fn both_layouts_hold_the_same_values_at_out_index() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let sizes = [(31, 17, 0), (8, 8, 1), (400, 300, 1)];
    let (pixels, crops) = staged(&mut rng, &sizes);
    let (img, pat) = (shape(3, 24, Layout::Images), shape(3, 24, Layout::Patches { patch: 8 }));
    let (mut a, mut b) = (vec![f32::NAN; img.out_len()], vec![f32::NAN; pat.out_len()]);
    cpu::augment(&pixels, &crops, &mut a, &img);
    cpu::augment(&pixels, &crops, &mut b, &pat);
    let mut seen = vec![false; pat.out_len()];
    for bi in 0..3 {
        for c in 0..3 {
            for y in 0..24 {
                for x in 0..24 {
                    let (i, j) = (img.out_index(bi, c, y, x), pat.out_index(bi, c, y, x));
                    assert_eq!(a[i].to_bits(), b[j].to_bits(), "image {bi} channel {c} ({y}, {x})");
                    seen[j] = true;
                }
            }
        }
    }
    assert!(seen.iter().all(|&s| s), "out_index covers the patch rows");
}

#[test]
fn flip_mirrors_the_columns() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    for (w, h) in [(37, 29), (5, 90), (1, 3)] {
        let (pixels, mut crops) = staged(&mut rng, &[(w, h, 0), (w, h, 0)]);
        crops[1] = Crop { flip: 1, ..crops[0] }; // the same pixels, mirrored
        let s = shape(2, 19, Layout::Images);
        let mut out = vec![f32::NAN; s.out_len()];
        cpu::augment(&pixels, &crops, &mut out, &s);
        for c in 0..3 {
            for y in 0..19 {
                for x in 0..19 {
                    assert_eq!(
                        out[s.out_index(1, c, y, x)].to_bits(),
                        out[s.out_index(0, c, y, 18 - x)].to_bits(),
                        "crop {w}x{h} channel {c} ({y}, {x})"
                    );
                }
            }
        }
    }
}

/// The twin sums f32 weights that were normalized before rounding, so they add up to 1 only
/// within rounding: its uniform crop comes back within a few ulps of the colour's terms, not
/// bit for bit (the kernel's integer weights give it exactly: the device tests).
#[test]
fn a_uniform_crop_gives_its_normalized_colour() {
    let rgb = [200u8, 17, 255];
    for (w, h, size) in [
        (333, 250, 22),
        (7, 300, 14),
        (1, 1, 9),
        (50, 50, 224),
        (224, 224, 224),
        (3, 500, 16),
    ] {
        let pixels: Vec<u8> = (0..w * h).flat_map(|_| rgb).collect();
        let crops = [Crop {
            offset: 0,
            width: w as u32,
            height: h as u32,
            flip: (w % 2) as u32,
        }];
        let s = shape(1, size, Layout::Patches { patch: 1 });
        let (scale, bias) = s.scale_bias();
        let mut out = vec![f32::NAN; s.out_len()];
        cpu::augment(&pixels, &crops, &mut out, &s);
        for c in 0..3 {
            let want = rgb[c] as f32 * scale[c] + bias[c];
            let bound = 2f32.powi(-21) * (rgb[c] as f32 * scale[c] + bias[c].abs()); // 8 ulps
            for y in 0..size {
                for x in 0..size {
                    let got = out[s.out_index(0, c, y, x)];
                    assert!(
                        (got - want).abs() <= bound,
                        "crop {w}x{h} to {size}, channel {c} ({y}, {x}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_crop_of_the_output_size_is_copied_exactly() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    for (size, layout) in [(22, Layout::Patches { patch: 11 }), (14, Layout::Images), (1, Layout::Images)] {
        let (pixels, crops) = staged(&mut rng, &[(size as u32, size as u32, 0)]);
        let s = shape(1, size, layout);
        let (scale, bias) = s.scale_bias();
        let mut out = vec![f32::NAN; s.out_len()];
        cpu::augment(&pixels, &crops, &mut out, &s);
        let o = crops[0].offset as usize;
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let want = pixels[o + 3 * (y * size + x) + c] as f32 * scale[c] + bias[c];
                    assert_eq!(out[s.out_index(0, c, y, x)], want, "size {size} channel {c} ({y}, {x})");
                }
            }
        }
    }
}

#[test]
fn check_rejects_bad_tables_and_shapes() {
    let ok = Crop {
        offset: 2,
        width: 3,
        height: 4,
        flip: 1,
    };
    let s = shape(2, 8, Layout::Patches { patch: 4 });
    let len = 2 + 3 * 12 + 36; // two crops of 36 bytes from byte 2
    let second = Crop { offset: 38, ..ok };
    assert_eq!(s.check(&[ok, second], len), Ok(()));
    assert_eq!(
        s.check(&[ok, second, Crop::default()], len),
        Ok(()),
        "crops past the batch are not read"
    );
    let bad = |c: Crop| s.check(&[ok, c], len);
    assert!(s.check(&[ok], len).unwrap_err().contains("1 crops for a batch of 2"));
    assert!(bad(Crop { offset: 39, ..second }).is_err(), "one byte past the end");
    assert!(bad(Crop { width: 0, ..second }).is_err(), "empty");
    assert!(bad(Crop { height: 0, ..second }).is_err(), "empty");
    assert!(bad(Crop { flip: 2, ..second }).is_err(), "flip 2");
    assert!(
        bad(Crop {
            offset: u32::MAX,
            ..second
        })
        .is_err(),
        "offset far past the end"
    );
    // 3 * width * height = 2^64 + 4294967294: wrapping u64 it would end at byte 4294967294.
    let huge = Crop {
        offset: 0,
        width: u32::MAX,
        height: 1_431_655_766,
        flip: 0,
    };
    assert!(
        shape(1, 8, Layout::Images).check(&[huge], 4_294_967_294).is_err(),
        "an end past 2^64"
    );
    for (bad, what) in [
        (shape(2, 0, Layout::Images), "size 0"),
        (shape(2, 8, Layout::Patches { patch: 3 }), "patch 3 of 8"),
        (shape(2, 8, Layout::Patches { patch: 0 }), "patch 0"),
        (AugmentShape { std: [0.2, 0.0, 0.2], ..s }, "std 0"),
        (
            AugmentShape {
                std: [0.2, f32::NAN, 0.2],
                ..s
            },
            "std NaN",
        ),
    ] {
        assert!(bad.check_shape().is_err() && bad.check(&[ok, second], len).is_err(), "{what}");
    }
}

#[test]
#[should_panic(expected = "does not fit")]
fn the_twin_refuses_a_bad_table() {
    let crops = [Crop {
        offset: 0,
        width: 4,
        height: 4,
        flip: 0,
    }];
    cpu::augment(&[0u8; 47], &crops, &mut [0.0f32; 3 * 4 * 4], &shape(1, 4, Layout::Images));
}

// ---------------------------------------------------------------- launcher (device)

#[cfg(feature = "cuda")]
mod gpu {
    use super::{cases, shape, staged, Case};
    use crate::gpu_common::*;
    use mlvpt::gpu::{bf16, CudaSlice, GpuContext};
    use mlvpt::ops::augment::cuda::{self, Storage};
    use mlvpt::ops::augment::{cpu, AugmentShape, Crop, Layout};
    use rand_chacha::ChaCha8Rng;

    /// A storage type the tests read back as f32.
    trait Elem: Storage + Copy {
        fn nan_out(gpu: &GpuContext, n: usize) -> CudaSlice<Self>;
        fn to_f32(self) -> f32;
    }
    impl Elem for f32 {
        fn nan_out(gpu: &GpuContext, n: usize) -> CudaSlice<Self> {
            nan_f32(gpu, n)
        }
        fn to_f32(self) -> f32 {
            self
        }
    }
    impl Elem for bf16 {
        fn nan_out(gpu: &GpuContext, n: usize) -> CudaSlice<Self> {
            nan_bf16(gpu, n)
        }
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }

    /// The kernel's output for `crops` (NaN-poisoned first, so a value it never writes fails).
    fn run<T: Elem>(gpu: &GpuContext, pixels: &[u8], crops: &[Crop], s: &AugmentShape) -> Vec<f32> {
        let mut out = T::nan_out(gpu, s.out_len());
        let (cd, pd) = (gpu.upload(crops).unwrap(), gpu.upload(pixels).unwrap());
        cuda::augment::<T>(gpu, gpu.stream(), &cd, &pd, &mut out, s).unwrap();
        gpu.download(&out).unwrap().iter().map(|v| v.to_f32()).collect()
    }

    /// The bound on |kernel - twin| per value: the two sum the same f32 weights' products in
    /// other orders (the kernel's weights are integers, normalized once per axis), a few ulps of
    /// 255 after scaling by 1 / (255 std); bf16 storage adds its rounding of the value.
    fn bound<T: Elem>(want: f32) -> f64 {
        let f32_part = 1e-5 * (1.0 + want.abs() as f64);
        if T::INDEX == 0 {
            f32_part
        } else {
            f32_part + want.abs() as f64 / 256.0 // half an ulp of bf16 is 2^-9 relative
        }
    }

    fn check_against_twin<T: Elem>(gpu: &GpuContext, rng: &mut ChaCha8Rng, seed: u64, case: &Case) {
        let &(size, layout, ref sizes) = case;
        let s = shape(sizes.len(), size, layout);
        let (pixels, crops) = staged(rng, sizes);
        let got = run::<T>(gpu, &pixels, &crops, &s);
        let mut want = vec![f32::NAN; s.out_len()];
        cpu::augment(&pixels, &crops, &mut want, &s);
        let want64 = to_f64(&want);
        let what = format!("storage {} size {size} {layout:?} crops {sizes:?}", ["f32", "bf16"][T::INDEX]);
        assert_within(&what, &got, &want64, |i| bound::<T>(want[i]), seed);
    }

    fn kernel_matches_twin<T: Elem>(name: &str) {
        let gpu = gpu();
        let (mut rng, seed) = rng(name);
        // The awkward cases, then the training shape: S 224 in 16 x 16 patches, crops like the
        // cache's and like JPEGs, larger and smaller than the output, the output's own size, a
        // strip.
        let training = vec![
            (180, 160, 1),
            (400, 300, 0),
            (500, 375, 1),
            (224, 224, 0),
            (90, 61, 1),
            (1023, 7, 0),
        ];
        for case in cases().iter().chain([&(224, Layout::Patches { patch: 16 }, training)]) {
            check_against_twin::<T>(&gpu, &mut rng, seed, case);
        }
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn augment_matches_cpu_in_fp32() {
        kernel_matches_twin::<f32>("augment fp32");
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn augment_matches_cpu_in_bf16() {
        kernel_matches_twin::<bf16>("augment bf16");
    }

    /// Uniform crops give exactly their normalized colour on the device, and a crop of the
    /// output's size (not flipped) exactly its pixels: integer weights, one correctly rounded
    /// division per axis, and the twin's unfused `v * scale + bias`.
    #[test]
    #[ignore = "requires a CUDA device"]
    fn exact_cases_are_exact_on_the_device() {
        let gpu = gpu();
        let (mut rng, seed) = rng("augment exact");
        let rgb = [200u8, 17, 255];
        for layout in [Layout::Images, Layout::Patches { patch: 11 }] {
            let s = shape(4, 22, layout);
            let (mut pixels, crops) = staged(&mut rng, &[(333, 250, 1), (22, 22, 0), (7, 300, 0), (1, 1, 1)]);
            for b in [0, 2, 3] {
                let o = crops[b].offset as usize;
                let n = 3 * (crops[b].width * crops[b].height) as usize;
                for (i, v) in pixels[o..o + n].iter_mut().enumerate() {
                    *v = rgb[i % 3];
                }
            }
            let got = run::<f32>(&gpu, &pixels, &crops, &s);
            let (scale, bias) = s.scale_bias();
            for b in 0..4 {
                for c in 0..3 {
                    for y in 0..22 {
                        for x in 0..22 {
                            let v = if b == 1 {
                                pixels[crops[1].offset as usize + 3 * (y * 22 + x) + c]
                            } else {
                                rgb[c]
                            };
                            let want = v as f32 * scale[c] + bias[c];
                            let g = got[s.out_index(b, c, y, x)];
                            assert_eq!(g, want, "{layout:?} crop {b} channel {c} ({y}, {x}) (MLVPT_TEST_SEED={seed})");
                        }
                    }
                }
            }
        }
    }

    /// A crop outside the buffer, empty, or with flip 2 gives NaN for every value of its image;
    /// the other images are as the twin writes them.
    #[test]
    #[ignore = "requires a CUDA device"]
    fn a_bad_crop_gives_nan_for_its_image_only() {
        let gpu = gpu();
        let (mut rng, seed) = rng("augment bad crop");
        let s = shape(3, 14, Layout::Patches { patch: 7 });
        let (pixels, crops) = staged(&mut rng, &[(20, 30, 0), (9, 9, 1), (31, 5, 0)]);
        let len = pixels.len() as u32;
        let per = 3 * 14 * 14;
        let mut want = vec![f32::NAN; s.out_len()];
        cpu::augment(&pixels, &crops, &mut want, &s);
        for bad in [
            Crop {
                offset: len - 3 * 81 + 1,
                ..crops[1]
            }, // one byte past the end
            Crop { width: 0, ..crops[1] },
            Crop { height: 0, ..crops[1] },
            Crop { flip: 2, ..crops[1] },
            Crop {
                offset: u32::MAX,
                ..crops[1]
            },
            Crop {
                width: u32::MAX,
                height: 1_431_655_766,
                ..crops[1]
            }, // 3 w h wraps u64
        ] {
            let table = [crops[0], bad, crops[2]];
            let got = run::<f32>(&gpu, &pixels, &table, &s);
            assert!(got[per..2 * per].iter().all(|v| v.is_nan()), "{bad:?}: image 1 is NaN");
            for b in [0, 2] {
                let r = b * per..(b + 1) * per;
                let w = to_f64(&want[r.clone()]);
                assert_within(&format!("{bad:?}: image {b}"), &got[r], &w, |i| 1e-5 * (1.0 + w[i].abs()), seed);
            }
        }
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn the_launcher_checks_what_the_host_can() {
        let gpu = gpu();
        let (mut rng, _) = rng("augment launcher");
        let (pixels, crops) = staged(&mut rng, &[(20, 30, 0), (9, 9, 1)]);
        let (cd, pd) = (gpu.upload(&crops).unwrap(), gpu.upload(&pixels).unwrap());
        let s = shape(2, 8, Layout::Patches { patch: 4 });
        let mut out = nan_f32(&gpu, s.out_len());
        let call = |s: &AugmentShape, out: &mut CudaSlice<f32>, crops: &CudaSlice<Crop>| {
            cuda::augment::<f32>(&gpu, gpu.stream(), crops, &pd, out, s)
        };
        assert!(call(&s, &mut out, &cd).is_ok());
        let err = |r: Result<(), mlvpt::gpu::GpuError>| r.unwrap_err().to_string();
        assert!(err(call(&shape(3, 8, Layout::Images), &mut out, &cd)).contains("crops has 2 elements, needs 3"));
        let mut short = nan_f32(&gpu, s.out_len() - 1);
        assert!(err(call(&s, &mut short, &cd)).contains("out has"));
        assert!(err(call(&shape(2, 8, Layout::Patches { patch: 3 }), &mut out, &cd)).contains("multiple of patch 3"));
        assert!(call(&shape(2, 0, Layout::Images), &mut out, &cd).is_err());
        assert!(call(&AugmentShape { std: [1.0, 0.0, 1.0], ..s }, &mut out, &cd).is_err());
        let too_big = shape(0, cuda::MAX_SIZE + 1, Layout::Images);
        assert!(err(call(&too_big, &mut out, &cd)).contains("exceeds"));
        // A batch of 0 launches nothing and writes nothing.
        let mut fresh = nan_f32(&gpu, s.out_len());
        call(&shape(0, 8, Layout::Images), &mut fresh, &cd).unwrap();
        assert!(gpu.download(&fresh).unwrap().iter().all(|v| v.is_nan()));
    }
}
