//! Datasets for training and evaluation: the procedural default (`synthetic`) and real image
//! datasets (`sources`: VOC 2007, COCO 2014, manifests; `images`: decoding).
//!
//! Images are f32 NCHW, already normalized; targets are f32 0/1, `n x K` row-major.

pub mod augment;
pub mod cache;
pub mod crops;
pub mod images;
pub mod loader;
pub mod sources;
pub mod synthetic;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use images::Norm;
pub use sources::{ImageDataConfig, LoadReport};
pub use synthetic::SyntheticConfig;

/// Where a run's data comes from. Stored in checkpoints (as JSON) so `eval` and `predict`
/// can rebuild the same splits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataConfig {
    Synthetic(SyntheticConfig),
    /// Image files (VOC, COCO, manifest) or a prepared cache, decoded batch by batch.
    Images(ImageDataConfig),
}

impl DataConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            DataConfig::Synthetic(c) => c.validate(),
            DataConfig::Images(c) => c.validate(),
        }
    }

    /// Side length of the (square) images this data produces.
    pub fn image_size(&self) -> usize {
        match self {
            DataConfig::Synthetic(c) => c.image_size,
            DataConfig::Images(c) => c.image_size,
        }
    }

    pub fn labels(&self) -> usize {
        match self {
            DataConfig::Synthetic(c) => c.labels,
            DataConfig::Images(c) => c.classes.len(),
        }
    }

    pub fn class_names(&self) -> Vec<String> {
        match self {
            DataConfig::Synthetic(c) => c.class_names(),
            DataConfig::Images(c) => c.classes.clone(),
        }
    }

    pub fn train_split(&self) -> anyhow::Result<Dataset> {
        Ok(self.split_with_report(Split::Train)?.0)
    }

    pub fn test_split(&self) -> anyhow::Result<Dataset> {
        Ok(self.split_with_report(Split::Test)?.0)
    }

    /// A split and, for image files, what was skipped or noticed while loading it.
    pub fn split_with_report(&self, split: Split) -> anyhow::Result<(Dataset, Option<LoadReport>)> {
        match self {
            DataConfig::Synthetic(c) => Ok((c.generate(split), None)),
            DataConfig::Images(c) => {
                let (d, r) = c.load(split)?;
                Ok((d, Some(r)))
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// One split held in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Number of images.
    pub n: usize,
    /// Number of labels.
    pub k: usize,
    pub channels: usize,
    pub image_size: usize,
    /// `n x channels x image_size x image_size`, normalized.
    pub images: Vec<f32>,
    /// `n x k`, 0/1.
    pub targets: Vec<f32>,
}

impl Dataset {
    /// Floats per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.image_size * self.image_size
    }

    pub fn image(&self, i: usize) -> &[f32] {
        let l = self.image_len();
        &self.images[i * l..(i + 1) * l]
    }

    pub fn target(&self, i: usize) -> &[f32] {
        &self.targets[i * self.k..(i + 1) * self.k]
    }

    /// Copies the images and targets of `indices` (in that order) into the buffers,
    /// replacing their contents.
    pub fn gather(&self, indices: &[usize], images: &mut Vec<f32>, targets: &mut Vec<f32>) {
        images.clear();
        targets.clear();
        for &i in indices {
            images.extend_from_slice(self.image(i));
            targets.extend_from_slice(self.target(i));
        }
    }

    /// The images `indices` (in that order) as a dataset of their own.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let (mut images, mut targets) = (Vec::new(), Vec::new());
        self.gather(indices, &mut images, &mut targets);
        Self {
            n: indices.len(),
            k: self.k,
            channels: self.channels,
            image_size: self.image_size,
            images,
            targets,
        }
    }

    /// Fraction of images carrying each label.
    pub fn positive_rates(&self) -> Vec<f64> {
        positive_rates(&self.targets, self.k)
    }

    /// Label indices of each image (for co-occurrence counting).
    pub fn label_lists(&self) -> Vec<Vec<usize>> {
        self.targets
            .chunks_exact(self.k)
            .map(|row| row.iter().enumerate().filter(|(_, &t)| t > 0.5).map(|(j, _)| j).collect())
            .collect()
    }
}

/// mAP (percent) of a predictor that gives every image the same score: with all scores tied,
/// a class's AP is its positive rate, so this is the mean positive rate over classes that have
/// positives. The reference line a trained model must beat.
pub fn constant_predictor_map(d: &Dataset) -> f64 {
    constant_map(&d.targets, d.k)
}

/// [`constant_predictor_map`] from 0/1 targets `n x k` alone (a streamed split has no images
/// in memory).
pub fn constant_map(targets: &[f32], k: usize) -> f64 {
    let rates: Vec<f64> = positive_rates(targets, k).into_iter().filter(|&r| r > 0.0).collect();
    if rates.is_empty() {
        return 0.0;
    }
    100.0 * rates.iter().sum::<f64>() / rates.len() as f64
}

/// Fraction of the rows of 0/1 targets `n x k` carrying each label.
pub fn positive_rates(targets: &[f32], k: usize) -> Vec<f64> {
    let mut counts = vec![0usize; k];
    for row in targets.chunks_exact(k) {
        for (c, &t) in counts.iter_mut().zip(row) {
            if t > 0.5 {
                *c += 1;
            }
        }
    }
    let n = targets.len() / k.max(1);
    counts.iter().map(|&c| c as f64 / n.max(1) as f64).collect()
}

/// SplitMix64 finalizer: turns (seed, stream) into a well-mixed seed, so every random
/// stream of a run is a pure function of the run's seed and its own name.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order in which epoch `epoch` visits `n` training images. A function of (seed, epoch)
/// only, never of process state, so a resumed run sees exactly the batches an uninterrupted
/// run would have seen.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(derive_seed(seed, 0x5348_5546), epoch));
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_permutation_fixed_by_seed_and_epoch() {
        let a = epoch_order(100, 7, 3);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 7, 3));
        assert_ne!(a, epoch_order(100, 7, 4));
        assert_ne!(a, epoch_order(100, 8, 3));
    }

    #[test]
    fn constant_predictor_map_is_mean_positive_rate() {
        // 4 images, 3 labels; label 2 never occurs and is left out.
        let d = Dataset {
            n: 4,
            k: 3,
            channels: 1,
            image_size: 1,
            images: vec![0.0; 4],
            targets: vec![1., 0., 0., 1., 1., 0., 0., 0., 0., 1., 1., 0.],
        };
        assert_eq!(d.positive_rates(), vec![0.75, 0.5, 0.0]);
        assert!((constant_predictor_map(&d) - 62.5).abs() < 1e-12);
        assert_eq!(d.label_lists(), vec![vec![0], vec![0, 1], vec![], vec![0, 1]]);
    }

    #[test]
    fn constant_predictor_map_agrees_with_the_metrics() {
        let c = SyntheticConfig {
            test: 300,
            ..SyntheticConfig::demo(5)
        };
        let d = c.generate(Split::Test);
        let m = crate::metrics::evaluate(&vec![0.3; d.n * d.k], &d.targets, d.n, d.k, 0.5);
        assert!(
            (m.map - constant_predictor_map(&d)).abs() < 1e-9,
            "{} vs {}",
            m.map,
            constant_predictor_map(&d)
        );
        assert!(m.map > 5.0 && m.map < 30.0);
    }

    #[test]
    fn gather_copies_rows_in_order() {
        let d = Dataset {
            n: 3,
            k: 2,
            channels: 1,
            image_size: 1,
            images: vec![10., 11., 12.],
            targets: vec![1., 0., 0., 1., 1., 1.],
        };
        let (mut x, mut y) = (vec![99.0], vec![]);
        d.gather(&[2, 0], &mut x, &mut y);
        assert_eq!(x, vec![12., 10.]);
        assert_eq!(y, vec![1., 1., 1., 0.]);
        let s = d.subset(&[1]);
        assert_eq!((s.n, s.images.clone(), s.targets.clone()), (1, vec![11.], vec![0., 1.]));
    }
}
