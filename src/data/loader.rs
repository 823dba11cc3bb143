//! Training batches streamed from image files or a prepared cache: each batch is decoded,
//! augmented and normalized in parallel (rayon), and the next batch is prepared on a worker
//! thread while the current one trains. Augmentation draws are a function of (seed, epoch,
//! image index), so results do not depend on threads or on resuming. Test batches stream the
//! same way ([`TestLoader`]), with the test transform, so evaluation holds O(batch) images.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::augment::{test_transform, train_transform};
use super::cache::Cache;
use super::derive_seed;
use super::images::{load_rgb_full, normalize_into, Norm, Skipped};

/// Seed stream of the augmentation draws.
const AUGMENT_STREAM: u64 = 0xA6;

/// Where the images are.
pub enum ImageStore {
    /// Image files, decoded at their own size.
    Files(Vec<PathBuf>),
    /// Records of a prepared cache (already at the cache's size).
    Cache { cache: Arc<Cache>, records: Vec<usize> },
}

impl ImageStore {
    pub fn len(&self) -> usize {
        match self {
            ImageStore::Files(f) => f.len(),
            ImageStore::Cache { records, .. } => records.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Image `i` as RGB8, or why it cannot be read.
    pub fn rgb(&self, i: usize) -> Result<RgbImage, String> {
        match self {
            ImageStore::Files(f) => load_rgb_full(&f[i]),
            ImageStore::Cache { cache, records } => cache.rgb(records[i]).map_err(|e| e.to_string()),
        }
    }
    /// A name for image `i` in reports.
    pub fn describe(&self, i: usize) -> String {
        match self {
            ImageStore::Files(f) => f[i].display().to_string(),
            ImageStore::Cache { cache, records } => format!("{} record {}", cache.path().display(), records[i]),
        }
    }
}

/// A training split that streams: its store, 0/1 targets `n x k`, and how to prepare images.
pub struct TrainLoader {
    pub store: ImageStore,
    pub targets: Vec<f32>,
    pub k: usize,
    pub size: usize,
    pub norm: Norm,
    pub seed: u64,
}

/// One prepared batch. `skipped` are the images of the batch that could not be read (left
/// out of `images` and `targets`), with why.
#[derive(Debug, Default)]
pub struct Batch {
    pub images: Vec<f32>,
    pub targets: Vec<f32>,
    pub n: usize,
    pub skipped: Vec<(String, String)>,
}

impl TrainLoader {
    pub fn len(&self) -> usize {
        self.store.len()
    }
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Label indices of each image (for grouping), without reading any image.
    pub fn label_lists(&self) -> Vec<Vec<usize>> {
        self.targets
            .chunks_exact(self.k)
            .map(|r| r.iter().enumerate().filter(|(_, &t)| t > 0.5).map(|(j, _)| j).collect())
            .collect()
    }

    /// The seed of `epoch`'s augmentation draws; image `i` draws from
    /// `derive_seed(epoch_seed, i)`.
    pub(crate) fn epoch_seed(&self, epoch: u64) -> u64 {
        derive_seed(derive_seed(self.seed, AUGMENT_STREAM), epoch)
    }

    /// The augmented, normalized batch of `indices` for `epoch`.
    pub fn batch(&self, indices: &[usize], epoch: u64) -> Batch {
        let len = 3 * self.size * self.size;
        let epoch_seed = self.epoch_seed(epoch);
        let prepared: Vec<Result<Vec<f32>, String>> = indices
            .par_iter()
            .map(|&i| {
                let img = self.store.rgb(i)?;
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(epoch_seed, i as u64));
                let img = train_transform(&mut rng, &img, self.size as u32);
                let mut v = vec![0f32; len];
                normalize_into(&img, self.norm, &mut v);
                Ok(v)
            })
            .collect();
        let mut b = Batch {
            images: Vec::with_capacity(indices.len() * len),
            ..Batch::default()
        };
        for (&i, r) in indices.iter().zip(prepared) {
            match r {
                Ok(v) => {
                    b.images.extend_from_slice(&v);
                    b.targets.extend_from_slice(&self.targets[i * self.k..(i + 1) * self.k]);
                    b.n += 1;
                }
                Err(why) => b.skipped.push((self.store.describe(i), why)),
            }
        }
        b
    }

    /// The batches of one epoch, each prepared on a worker thread one batch ahead.
    pub fn epoch(self: &Arc<Self>, batches: Vec<Vec<usize>>, epoch: u64) -> Receiver<Batch> {
        let (tx, rx) = sync_channel(1);
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            for idx in batches {
                // The receiver hung up (training stopped): stop preparing.
                if tx.send(me.batch(&idx, epoch)).is_err() {
                    break;
                }
            }
        });
        rx
    }
}

/// Image `i` of `store` with the test transform (resize to `size`, normalize), or why it
/// cannot be read.
pub fn test_image(store: &ImageStore, i: usize, size: usize, norm: Norm) -> Result<Vec<f32>, String> {
    let img = test_transform(&store.rgb(i)?, size as u32);
    let mut v = vec![0f32; 3 * size * size];
    normalize_into(&img, norm, &mut v);
    Ok(v)
}

/// A test split that streams: its readable images (found once, when it is opened), their
/// targets, and how to prepare them. Images are decoded only when a batch asks for them.
pub struct TestLoader {
    pub store: ImageStore,
    /// Store indices of the readable images, in order: test image `i` is `store` image `readable[i]`.
    pub readable: Vec<usize>,
    /// 0/1 targets of the readable images, `len() x k`.
    pub targets: Vec<f32>,
    pub k: usize,
    pub size: usize,
    pub norm: Norm,
}

impl TestLoader {
    /// Decodes every image of `store` once (in parallel, keeping none) to find the unreadable
    /// ones, which are returned apart with why; `targets` are the store's, `store.len() x k`.
    pub fn open(store: ImageStore, targets: &[f32], k: usize, size: usize, norm: Norm) -> (Self, Vec<Skipped>) {
        let errors: Vec<Option<String>> = (0..store.len()).into_par_iter().map(|i| store.rgb(i).err()).collect();
        let (mut readable, mut skipped, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        for (i, e) in errors.into_iter().enumerate() {
            match e {
                None => {
                    readable.push(i);
                    kept.extend_from_slice(&targets[i * k..(i + 1) * k]);
                }
                Some(reason) => skipped.push(Skipped {
                    path: PathBuf::from(store.describe(i)),
                    reason,
                }),
            }
        }
        (
            Self {
                store,
                readable,
                targets: kept,
                k,
                size,
                norm,
            },
            skipped,
        )
    }

    pub fn len(&self) -> usize {
        self.readable.len()
    }
    pub fn is_empty(&self) -> bool {
        self.readable.is_empty()
    }

    /// Test images `indices` (in that order), decoded in parallel, `indices.len() x 3 x size x size`.
    /// An image that was readable when the split was opened and no longer is, is an error.
    pub fn batch(&self, indices: &[usize]) -> anyhow::Result<Vec<f32>> {
        let decoded: Vec<Result<Vec<f32>, String>> = indices
            .par_iter()
            .map(|&i| test_image(&self.store, self.readable[i], self.size, self.norm))
            .collect();
        let mut out = Vec::with_capacity(indices.len() * 3 * self.size * self.size);
        for (&i, r) in indices.iter().zip(decoded) {
            let v = r.map_err(|why| anyhow::anyhow!("test image {} became unreadable: {why}", self.store.describe(self.readable[i])))?;
            out.extend_from_slice(&v);
        }
        Ok(out)
    }

    /// The batches `batches` of test images, each decoded on a worker thread one batch ahead.
    pub fn batches(self: &Arc<Self>, batches: Vec<Vec<usize>>) -> Receiver<anyhow::Result<Vec<f32>>> {
        let (tx, rx) = sync_channel(1);
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            for idx in batches {
                // The receiver hung up (evaluation stopped): stop decoding.
                if tx.send(me.batch(&idx)).is_err() {
                    break;
                }
            }
        });
        rx
    }
}
