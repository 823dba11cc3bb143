//! The procedural default dataset: small noisy images, each showing a few labelled objects,
//! with co-occurrence and exclusion between labels planted on purpose so label grouping has
//! something to find.
//!
//! - Label k is an object with its own colour (a 20-colour high-contrast palette), texture
//!   (solid, horizontal or vertical stripes, checker) and shape (square, disc, diamond, cross).
//!   The backbone is random and frozen, so the label signal must be visible to a random patch
//!   embedding: colour and texture are, which is why every label has a distinct colour first.
//! - Labels come in scenes of `scene_size` consecutive labels. An image picks one scene, shows
//!   each of its labels with probability 1/2 (at least one), and with probability 0.35 one
//!   extra label from another scene: labels of a scene co-occur.
//! - Scenes pair up (0 with 1, 2 with 3, ...): the extra label never comes from the partner
//!   scene, so labels of partner scenes never appear together (planted exclusion).
//! - Each present label's object is drawn `copies` times, each copy filling a distinct random
//!   cell of a 4x4 grid (no occlusion), on a dark grey background of random level with uniform
//!   pixel noise. The copies matter: a random ViT's attention is nearly uniform, so what reaches
//!   the prompt tokens is close to an average over the patches, and a label must cover a
//!   visible share of the image to move that average.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{derive_seed, Dataset, Split};

/// Kelly/Trubetskoy-style distinct colours (grey left out: it is the background).
const PALETTE: [(&str, [f32; 3]); 20] = [
    ("red", [0.90, 0.10, 0.29]),
    ("green", [0.24, 0.71, 0.29]),
    ("yellow", [1.00, 0.88, 0.10]),
    ("blue", [0.26, 0.39, 0.85]),
    ("orange", [0.96, 0.51, 0.19]),
    ("purple", [0.57, 0.12, 0.71]),
    ("cyan", [0.26, 0.83, 0.96]),
    ("magenta", [0.94, 0.20, 0.90]),
    ("lime", [0.75, 0.94, 0.27]),
    ("pink", [0.98, 0.75, 0.83]),
    ("teal", [0.27, 0.60, 0.56]),
    ("lavender", [0.86, 0.75, 1.00]),
    ("brown", [0.60, 0.39, 0.14]),
    ("beige", [1.00, 0.98, 0.78]),
    ("maroon", [0.50, 0.00, 0.00]),
    ("mint", [0.67, 1.00, 0.76]),
    ("olive", [0.50, 0.50, 0.00]),
    ("apricot", [1.00, 0.85, 0.69]),
    ("navy", [0.00, 0.00, 0.46]),
    ("black", [0.02, 0.02, 0.02]),
];
const TEXTURES: [&str; 4] = ["solid", "hstripes", "vstripes", "checker"];
const SHAPES: [&str; 4] = ["square", "disc", "diamond", "cross"];
/// Cells per side of the placement grid.
const GRID: usize = 4;
/// Distinct (colour, texture, shape) triples the appearance rule below can make.
pub const MAX_LABELS: usize = PALETTE.len() * 16;
/// Chance that an image shows one label from outside its scene.
const EXTRA_LABEL_P: f64 = 0.35;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticConfig {
    /// Number of labels K.
    pub labels: usize,
    /// Image side in pixels (3 channels).
    pub image_size: usize,
    /// Images in the training split.
    pub train: usize,
    /// Images in the test split.
    pub test: usize,
    /// Labels per scene (the planted co-occurrence blocks).
    pub scene_size: usize,
    /// Copies of each present object (in distinct cells), so a label covers a share of the
    /// image a random backbone's mostly uniform attention can see.
    pub copies: usize,
    /// Amplitude of the uniform pixel noise, in [0, 1] pixel units.
    pub noise: f32,
    pub seed: u64,
}

impl SyntheticConfig {
    /// The embedded demo's data: K = 20, 32x32 images.
    pub fn demo(seed: u64) -> Self {
        Self {
            labels: 20,
            image_size: 32,
            train: 1024,
            test: 512,
            scene_size: 4,
            copies: 3,
            noise: 0.05,
            seed,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (2..=MAX_LABELS).contains(&self.labels),
            "synthetic data: labels must be in 2..={MAX_LABELS}, got {}",
            self.labels
        );
        anyhow::ensure!(
            self.image_size >= 4 * GRID,
            "synthetic data: image size must be at least {}, got {}",
            4 * GRID,
            self.image_size
        );
        anyhow::ensure!(self.train >= 1, "synthetic data: the training split needs at least 1 image, got 0");
        anyhow::ensure!(self.test >= 1, "synthetic data: the test split needs at least 1 image, got 0");
        anyhow::ensure!(self.scene_size >= 1, "synthetic data: scene size must be at least 1, got 0");
        anyhow::ensure!(self.copies >= 1, "synthetic data: copies must be at least 1, got 0");
        anyhow::ensure!(
            (self.scene_size + 1) * self.copies <= GRID * GRID,
            "synthetic data: up to {} objects per image ((scene size {} + 1) x {} copies) do not fit the {} cells",
            (self.scene_size + 1) * self.copies,
            self.scene_size,
            self.copies,
            GRID * GRID
        );
        anyhow::ensure!(
            self.noise.is_finite() && (0.0..=1.0).contains(&self.noise),
            "synthetic data: noise must be in [0, 1], got {}",
            self.noise
        );
        Ok(())
    }

    pub fn scenes(&self) -> usize {
        self.labels.div_ceil(self.scene_size)
    }

    /// The scene whose labels never appear together with scene `s`'s (s xor 1), if it exists.
    pub fn partner(&self, s: usize) -> Option<usize> {
        let p = s ^ 1;
        (p < self.scenes()).then_some(p)
    }

    fn scene_labels(&self, s: usize) -> std::ops::Range<usize> {
        s * self.scene_size..((s + 1) * self.scene_size).min(self.labels)
    }

    pub fn class_names(&self) -> Vec<String> {
        (0..self.labels)
            .map(|k| {
                let a = appearance(k);
                format!("{}-{}-{}", PALETTE[a.colour].0, TEXTURES[a.texture], SHAPES[a.shape])
            })
            .collect()
    }

    /// Generates one split. Train and test come from separate random streams of the seed, so
    /// the test split is the same whatever the training split's size.
    pub fn generate(&self, split: Split) -> Dataset {
        let stream = match split {
            Split::Train => 1,
            Split::Test => 2,
        };
        let n = match split {
            Split::Train => self.train,
            Split::Test => self.test,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.seed, stream));
        let (k, s) = (self.labels, self.image_size);
        let plane = s * s;
        let mut images = vec![0f32; n * 3 * plane];
        let mut targets = vec![0f32; n * k];
        let mut pixels = vec![0f32; 3 * plane];
        for i in 0..n {
            let labels = self.draw_labels(&mut rng);
            self.draw_image(&labels, &mut rng, &mut pixels);
            for &l in &labels {
                targets[i * k + l] = 1.0;
            }
            // Normalize [0, 1] pixels to roughly zero mean, unit spread.
            for (o, &p) in images[i * 3 * plane..(i + 1) * 3 * plane].iter_mut().zip(&pixels) {
                *o = (p - 0.5) / 0.25;
            }
        }
        Dataset {
            n,
            k,
            channels: 3,
            image_size: s,
            images,
            targets,
        }
    }

    fn draw_labels(&self, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let scene = rng.random_range(0..self.scenes());
        let members = self.scene_labels(scene);
        let mut labels: Vec<usize> = members.clone().filter(|_| rng.random_bool(0.5)).collect();
        if labels.is_empty() {
            labels.push(rng.random_range(members));
        }
        let others: Vec<usize> = (0..self.scenes())
            .filter(|&t| t != scene && Some(t) != self.partner(scene))
            .collect();
        if !others.is_empty() && rng.random_bool(EXTRA_LABEL_P) {
            let t = others[rng.random_range(0..others.len())];
            labels.push(rng.random_range(self.scene_labels(t)));
        }
        labels
    }

    /// Draws the objects of `labels` into `pixels` (3 x s x s, values in [0, 1]).
    fn draw_image(&self, labels: &[usize], rng: &mut ChaCha8Rng, pixels: &mut [f32]) {
        let s = self.image_size;
        let plane = s * s;
        // A dark background: with a level away from the normalization's centre (0.5) every
        // background patch embeds to nearly the same direction after LayerNorm, so the objects
        // stand out to a random backbone.
        let background: f32 = rng.random_range(0.25..0.35);
        pixels.fill(background);
        // Distinct cells, so no object hides another; each object fills its cell, so with the
        // demo's sizes (32 px, 8 px cells, patch 4) it covers 2x2 patches of its own look
        // wherever it lands, and the mean over patches is nearly linear in the labels.
        let cell = s / GRID;
        let mut cells: Vec<usize> = (0..GRID * GRID).collect();
        let placed: Vec<usize> = labels.iter().flat_map(|&l| std::iter::repeat_n(l, self.copies)).collect();
        for (j, &label) in placed.iter().enumerate() {
            let pick = rng.random_range(j..cells.len());
            cells.swap(j, pick);
            let x0 = (cells[j] % GRID) * cell;
            let y0 = (cells[j] / GRID) * cell;
            let a = appearance(label);
            let colour = PALETTE[a.colour].1;
            for dy in 0..cell {
                for dx in 0..cell {
                    if !inside(a.shape, dx, dy, cell) {
                        continue;
                    }
                    let f = texture_factor(a.texture, dx, dy);
                    let at = (y0 + dy) * s + (x0 + dx);
                    for c in 0..3 {
                        pixels[c * plane + at] = colour[c] * f;
                    }
                }
            }
        }
        let a = self.noise;
        if a > 0.0 {
            for p in pixels.iter_mut() {
                *p = (*p + rng.random_range(-a..=a)).clamp(0.0, 1.0);
            }
        }
    }
}

struct Appearance {
    colour: usize,
    texture: usize,
    shape: usize,
}

/// Label k's look. Colour first (k mod 20); beyond 20 labels the (texture, shape) pair tells
/// labels of one colour apart: for a fixed colour, j = k / 20 maps to distinct pairs for j < 16.
fn appearance(k: usize) -> Appearance {
    let colour = k % PALETTE.len();
    let j = k / PALETTE.len();
    Appearance {
        colour,
        shape: (colour + j) % 4,
        texture: (colour / 4 + j / 4) % 4,
    }
}

fn texture_factor(texture: usize, dx: usize, dy: usize) -> f32 {
    // Stripes and checks of period 2 px: darker half at 45% of the colour.
    let dark = match texture {
        0 => false,
        1 => dy % 2 == 1,
        2 => dx % 2 == 1,
        _ => (dx / 2 + dy / 2) % 2 == 1,
    };
    if dark {
        0.45
    } else {
        1.0
    }
}

fn inside(shape: usize, dx: usize, dy: usize, size: usize) -> bool {
    // Coordinates relative to the centre, in units of half the size (so the shape fills [-1, 1]).
    let h = size as f32 / 2.0;
    let u = (dx as f32 + 0.5 - h) / h;
    let v = (dy as f32 + 0.5 - h) / h;
    match shape {
        0 => true,
        1 => u * u + v * v <= 1.0,
        2 => u.abs() + v.abs() <= 1.0,
        _ => u.abs() <= 0.34 || v.abs() <= 0.34,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            train: 600,
            test: 50,
            ..SyntheticConfig::demo(11)
        }
    }

    #[test]
    fn generation_is_deterministic_and_splits_differ() {
        let c = SyntheticConfig {
            train: 20,
            test: 20,
            ..small()
        };
        let a = c.generate(Split::Train);
        assert_eq!(a, c.generate(Split::Train));
        assert_ne!(a.images, c.generate(Split::Test).images);
        // The test split does not depend on the training split's size.
        let bigger = SyntheticConfig { train: 40, ..c.clone() };
        assert_eq!(c.generate(Split::Test), bigger.generate(Split::Test));
        assert_ne!(a, SyntheticConfig { seed: 12, ..c }.generate(Split::Train));
    }

    #[test]
    fn shapes_and_values_are_sane() {
        let c = small();
        let d = c.generate(Split::Test);
        assert_eq!((d.n, d.k, d.channels, d.image_size), (50, 20, 3, 32));
        assert_eq!(d.images.len(), 50 * 3 * 32 * 32);
        assert!(d.images.iter().all(|x| x.is_finite() && (-2.0..=2.0).contains(x)));
        for i in 0..d.n {
            let m = d.target(i).iter().filter(|&&t| t == 1.0).count();
            assert!((1..=c.scene_size + 1).contains(&m), "image {i} has {m} labels");
        }
    }

    #[test]
    fn planted_cooccurrence_and_exclusion() {
        let c = small();
        let d = c.generate(Split::Train);
        let k = c.labels;
        let mut pairs = vec![0usize; k * k];
        for list in d.label_lists() {
            for &a in &list {
                for &b in &list {
                    pairs[a * k + b] += 1;
                }
            }
        }
        let scene = |l: usize| l / c.scene_size;
        for a in 0..k {
            assert!(pairs[a * k + a] > 0, "label {a} never occurs");
            for b in 0..k {
                if a == b {
                    continue;
                }
                if c.partner(scene(a)) == Some(scene(b)) {
                    assert_eq!(pairs[a * k + b], 0, "labels {a} and {b} of partner scenes co-occur");
                }
            }
        }
        // Within a scene labels co-occur far more often than across scenes.
        let (mut within, mut across, mut nw, mut na) = (0usize, 0usize, 0usize, 0usize);
        for a in 0..k {
            for b in 0..k {
                if a == b || c.partner(scene(a)) == Some(scene(b)) {
                    continue;
                }
                if scene(a) == scene(b) {
                    within += pairs[a * k + b];
                    nw += 1;
                } else {
                    across += pairs[a * k + b];
                    na += 1;
                }
            }
        }
        assert!(within as f64 / nw as f64 > 3.0 * across as f64 / na as f64);
    }

    #[test]
    fn class_names_are_unique_up_to_the_maximum() {
        let c = SyntheticConfig {
            labels: MAX_LABELS,
            ..small()
        };
        let mut names = c.class_names();
        assert_eq!(names[0], "red-solid-square");
        names.sort();
        names.dedup();
        assert_eq!(names.len(), MAX_LABELS);
    }

    #[test]
    fn bad_configs_are_rejected() {
        for bad in [
            SyntheticConfig { labels: 1, ..small() },
            SyntheticConfig {
                labels: MAX_LABELS + 1,
                ..small()
            },
            SyntheticConfig { image_size: 15, ..small() },
            SyntheticConfig { train: 0, ..small() },
            SyntheticConfig { test: 0, ..small() },
            SyntheticConfig { scene_size: 0, ..small() },
            SyntheticConfig { copies: 0, ..small() },
            SyntheticConfig { copies: 4, ..small() },
            SyntheticConfig {
                noise: f32::NAN,
                ..small()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
        small().validate().unwrap();
    }
}
