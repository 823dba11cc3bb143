//! Training batches as uint8 crops for augmentation on the backend (`mlvpt train
//! --augment-on device`): the loader reads each image and draws its crop box and flip exactly
//! as [`TrainLoader::batch`] does (same seed, same draws), copies the crop's bytes and leaves
//! resize, flip and normalization to `ops::augment` (a kernel on a GPU). The host's work per
//! image is reading it and one copy of the crop.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::augment::{train_draw, TrainDraw};
use super::derive_seed;
use super::loader::TrainLoader;
use crate::ops::augment::Crop;

/// One batch of crops: each crop's bytes packed one after another in `pixels` (RGB8 rows,
/// no padding), located by `crops`; the rest as in [`super::loader::Batch`].
#[derive(Debug, Default)]
pub struct CropBatch {
    pub pixels: Vec<u8>,
    pub crops: Vec<Crop>,
    pub targets: Vec<f32>,
    pub n: usize,
    pub skipped: Vec<(String, String)>,
}

impl TrainLoader {
    /// The crops of `indices` for `epoch`: the same crop boxes and flips as
    /// [`TrainLoader::batch`] draws, not yet resized.
    pub fn crop_batch(&self, indices: &[usize], epoch: u64) -> CropBatch {
        let epoch_seed = self.epoch_seed(epoch);
        // Each crop's bytes, and its table entry but for the offset.
        let cut: Vec<Result<(Vec<u8>, Crop), String>> = indices
            .par_iter()
            .map(|&i| {
                let img = self.store.pixels(i)?;
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(epoch_seed, i as u64));
                // The host loader's draws: the box, then the flip.
                let TrainDraw { crop: (x, y, w, h), flip } = train_draw(&mut rng, img.width, img.height);
                let row = 3 * img.width as usize;
                let (x, y, w, h) = (x as usize, y as usize, w as usize, h as usize);
                let mut px = Vec::with_capacity(3 * w * h);
                for r in y..y + h {
                    px.extend_from_slice(&img.data[r * row + 3 * x..r * row + 3 * (x + w)]);
                }
                let crop = Crop {
                    offset: 0,
                    width: w as u32,
                    height: h as u32,
                    flip: flip as u32,
                };
                Ok((px, crop))
            })
            .collect();
        let mut b = CropBatch {
            pixels: Vec::with_capacity(cut.iter().map(|r| r.as_ref().map_or(0, |c| c.0.len())).sum()),
            ..CropBatch::default()
        };
        for (&i, r) in indices.iter().zip(cut) {
            match r {
                Ok((px, crop)) => {
                    b.crops.push(Crop {
                        offset: b.pixels.len() as u32,
                        ..crop
                    });
                    b.pixels.extend_from_slice(&px);
                    b.targets.extend_from_slice(&self.targets[i * self.k..(i + 1) * self.k]);
                    b.n += 1;
                }
                Err(why) => b.skipped.push((self.store.describe(i), why)),
            }
        }
        b
    }

    /// The crop batches of one epoch, each prepared on a worker thread one batch ahead.
    pub fn crop_epoch(self: &Arc<Self>, batches: Vec<Vec<usize>>, epoch: u64) -> Receiver<CropBatch> {
        let (tx, rx) = sync_channel(1);
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            for idx in batches {
                // The receiver hung up (training stopped): stop preparing.
                if tx.send(me.crop_batch(&idx, epoch)).is_err() {
                    break;
                }
            }
        });
        rx
    }
}
