//! The paper's per-dataset settings (docs/MODEL.md#training-defaults-and-presets; the official
//! release's configs): image 224, batch 64, 40 epochs, AdamW, and T, E, lr by dataset.

use crate::train::run::RunSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// MS-COCO 2014: T 5, E 3, lr 5e-4.
    Coco,
    /// Pascal VOC 2007: T 10, E 3, lr 5e-4.
    Voc,
    /// NUS-WIDE: T 5, E 3, lr 5e-4.
    Nus,
    /// Visual Genome 256: T 5, E 3, lr 1e-4.
    Vg256,
    /// Objects365 (not in the paper; COCO's settings): T 5, E 3, lr 5e-4.
    O365,
}

/// Image side of every preset.
pub const PRESET_IMAGE_SIZE: usize = 224;

impl Preset {
    /// (T, E, lr).
    pub fn settings(self) -> (usize, usize, f64) {
        match self {
            Preset::Coco | Preset::Nus | Preset::O365 => (5, 3, 5e-4),
            Preset::Voc => (10, 3, 5e-4),
            Preset::Vg256 => (5, 3, 1e-4),
        }
    }

    /// Sets T, E, lr, batch 64 and 40 epochs (the image size is the caller's: it fixes the
    /// backbone and the data together).
    pub fn apply(self, spec: &mut RunSpec) {
        let (t, e, lr) = self.settings();
        spec.model.groups = t;
        spec.model.experts = e;
        spec.train.lr = lr;
        spec.train.batch_size = 64;
        spec.train.epochs = 40;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_set_the_papers_values() {
        let mut s = RunSpec::demo(0);
        Preset::Voc.apply(&mut s);
        assert_eq!(
            (s.model.groups, s.model.experts, s.train.lr, s.train.batch_size, s.train.epochs),
            (10, 3, 5e-4, 64, 40)
        );
        Preset::Vg256.apply(&mut s);
        assert_eq!((s.model.groups, s.train.lr), (5, 1e-4));
    }
}
