//! Training augmentation (docs/MODEL.md#images-and-augmentation): random resized crop (area
//! scale 0.5-1, aspect ratio 3/4-4/3, torchvision's sampling) and a horizontal flip with
//! probability 1/2; the test transform is a plain resize.

use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::Rng;

/// Crop area as a fraction of the image.
pub const CROP_SCALE: (f64, f64) = (0.5, 1.0);
/// Crop aspect ratio (width / height).
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// The crop box `(x, y, w, h)` torchvision's `RandomResizedCrop.get_params` would draw: up to
/// 10 tries of (area, log-uniform ratio) that fit, else a centre crop clamped to the ratios.
pub fn crop_box<R: Rng>(rng: &mut R, width: u32, height: u32) -> (u32, u32, u32, u32) {
    let (w0, h0) = (width as f64, height as f64);
    let area = w0 * h0;
    let (lr0, lr1) = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(CROP_SCALE.0..=CROP_SCALE.1);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let w = (target * ratio).sqrt().round();
        let h = (target / ratio).sqrt().round();
        if w >= 1.0 && h >= 1.0 && w <= w0 && h <= h0 {
            let (w, h) = (w as u32, h as u32);
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            return (x, y, w, h);
        }
    }
    let in_ratio = w0 / h0;
    let (w, h) = if in_ratio < CROP_RATIO.0 {
        (width, (w0 / CROP_RATIO.0).round() as u32)
    } else if in_ratio > CROP_RATIO.1 {
        ((h0 * CROP_RATIO.1).round() as u32, height)
    } else {
        (width, height)
    };
    let (w, h) = (w.clamp(1, width), h.clamp(1, height));
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// Random resized crop to `size x size`, then a horizontal flip half of the time.
pub fn train_transform<R: Rng>(rng: &mut R, img: &RgbImage, size: u32) -> RgbImage {
    let (x, y, w, h) = crop_box(rng, img.width(), img.height());
    let crop = imageops::crop_imm(img, x, y, w, h).to_image();
    let mut out = imageops::resize(&crop, size, size, FilterType::Triangle);
    if rng.random_bool(0.5) {
        imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// The test transform: resize to `size x size` (aspect ratio not kept).
pub fn test_transform(img: &RgbImage, size: u32) -> RgbImage {
    if img.width() == size && img.height() == size {
        return img.clone();
    }
    imageops::resize(img, size, size, FilterType::Triangle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn crop_boxes_fit_and_respect_scale_and_ratio() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (w, h) in [(224u32, 224u32), (500, 333), (40, 300), (1, 1), (3, 100)] {
            for _ in 0..200 {
                let (x, y, cw, ch) = crop_box(&mut rng, w, h);
                assert!(cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h, "{w}x{h}: {x},{y} {cw}x{ch}");
                if w >= 100 && h >= 100 {
                    let frac = (cw * ch) as f64 / (w * h) as f64;
                    assert!(frac > 0.48 && frac <= 1.0, "area {frac}");
                    let r = cw as f64 / ch as f64;
                    assert!(r > 0.7 && r < 1.4, "ratio {r}");
                }
            }
        }
    }

    #[test]
    fn train_transform_gives_the_size_and_flips_sometimes() {
        // A left-dark, right-bright ramp: a flipped output has its bright side on the left.
        let img = RgbImage::from_fn(64, 48, |x, _| image::Rgb([(x * 4) as u8; 3]));
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut flipped = 0;
        for _ in 0..40 {
            let o = train_transform(&mut rng, &img, 16);
            assert_eq!(o.dimensions(), (16, 16));
            if o.get_pixel(0, 8)[0] > o.get_pixel(15, 8)[0] {
                flipped += 1;
            }
        }
        assert!((5..=35).contains(&flipped), "{flipped} of 40 flipped");
        assert_eq!(test_transform(&img, 16).dimensions(), (16, 16));
    }
}
