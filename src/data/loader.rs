//! Training batches streamed from image files or a prepared cache: each batch is decoded,
//! augmented and normalized in parallel (rayon), each image straight into its slice of the
//! batch, and the next batch is prepared on a worker thread while the current one trains.
//! Cache records are read in place (borrowed from the map once their CRC checks).
//! Augmentation draws are a function of (seed, epoch, image index), so results do not depend
//! on threads or on resuming. Test batches stream the same way ([`TestLoader`]), with the test
//! transform, so evaluation holds O(batch) images.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvError, Sender};
use std::sync::Arc;

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::augment::{train_draw, with_resizer};
use super::cache::Cache;
use super::derive_seed;
use super::images::{load_rgb_full, normalize_rgb_into, Norm, NormTable, Skipped};

/// Seed stream of the augmentation draws.
const AUGMENT_STREAM: u64 = 0xA6;

/// RGB8 pixels of one image (rows packed): borrowed from a cache, or decoded.
pub struct Pixels<'a> {
    pub width: u32,
    pub height: u32,
    pub data: Cow<'a, [u8]>,
}

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
    /// The pixels of image `i` (borrowed from a cache, with its CRC checked), or why they
    /// cannot be read.
    pub fn pixels(&self, i: usize) -> Result<Pixels<'_>, String> {
        let p = match self {
            ImageStore::Files(f) => {
                let img = load_rgb_full(&f[i])?;
                let (width, height) = img.dimensions();
                Pixels {
                    width,
                    height,
                    data: Cow::Owned(img.into_raw()),
                }
            }
            ImageStore::Cache { cache, records } => {
                let s = cache.header().image_size as u32;
                Pixels {
                    width: s,
                    height: s,
                    data: Cow::Borrowed(cache.pixels(records[i]).map_err(|e| e.to_string())?),
                }
            }
        };
        if p.width == 0 || p.height == 0 {
            return Err(format!("empty image ({}x{})", p.width, p.height));
        }
        Ok(p)
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

    /// The augmented, normalized batch of `indices` for `epoch`: each image is cropped and
    /// resized (from the source rows, into this thread's buffer), then mirrored and normalized
    /// in one pass into its slice of the batch.
    pub fn batch(&self, indices: &[usize], epoch: u64) -> Batch {
        self.batch_into(indices, epoch, Vec::new())
    }

    /// [`TrainLoader::batch`] written into `images`, the buffer of an earlier batch handed
    /// back: reusing it saves allocating, and the OS zeroing and mapping, ~0.6 MB per 224 px
    /// image. Whatever `images` holds is overwritten or cut off.
    pub fn batch_into(&self, indices: &[usize], epoch: u64, mut images: Vec<f32>) -> Batch {
        assert!(self.size >= 1, "image size 0");
        let s = self.size;
        let len = 3 * s * s;
        let epoch_seed = self.epoch_seed(epoch);
        let table = NormTable::new(self.norm);
        let want = indices.len() * len;
        if images.capacity() < want {
            // Fresh, untouched zero pages rather than growing (which would copy and fill).
            images = vec![0f32; want];
        } else {
            images.resize(want, 0.0);
        }
        let results: Vec<Result<(), String>> = images
            .par_chunks_mut(len)
            .zip(indices.par_iter())
            .map(|(out, &i)| {
                let img = self.store.pixels(i)?;
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(epoch_seed, i as u64));
                let d = train_draw(&mut rng, img.width, img.height);
                with_resizer(|r| {
                    let px = r.resize_crop(&img.data, img.width, img.height, d.crop, s as u32);
                    normalize_rgb_into(px, s, s, d.flip, &table, out);
                });
                Ok(())
            })
            .collect();
        let mut b = Batch::default();
        for (j, (&i, r)) in indices.iter().zip(results).enumerate() {
            match r {
                Ok(()) => {
                    // Close the gaps the skipped images left.
                    if b.n != j {
                        images.copy_within(j * len..(j + 1) * len, b.n * len);
                    }
                    b.targets.extend_from_slice(&self.targets[i * self.k..(i + 1) * self.k]);
                    b.n += 1;
                }
                Err(why) => b.skipped.push((self.store.describe(i), why)),
            }
        }
        images.truncate(b.n * len);
        b.images = images;
        b
    }

    /// The batches of one epoch, each prepared on a worker thread one batch ahead; buffers
    /// handed back with [`EpochStream::recycle`] are written again.
    pub fn epoch(self: &Arc<Self>, batches: Vec<Vec<usize>>, epoch: u64) -> EpochStream {
        let (tx, rx) = sync_channel(1);
        let (spare_tx, spare_rx) = channel::<Vec<f32>>();
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            for idx in batches {
                let buffer = spare_rx.try_recv().unwrap_or_default();
                // The receiver hung up (training stopped): stop preparing.
                if tx.send(me.batch_into(&idx, epoch, buffer)).is_err() {
                    break;
                }
            }
        });
        EpochStream {
            batches: rx,
            spare: spare_tx,
        }
    }
}

/// The batches of one epoch from [`TrainLoader::epoch`], and the way back for their buffers.
pub struct EpochStream {
    batches: Receiver<Batch>,
    spare: Sender<Vec<f32>>,
}

impl EpochStream {
    /// The next batch; an error once the epoch's batches are all taken (or the loader thread
    /// died).
    pub fn recv(&self) -> Result<Batch, RecvError> {
        self.batches.recv()
    }

    /// Hands back the images of a batch that is no longer needed, for a later batch to be
    /// written into.
    pub fn recycle(&self, images: Vec<f32>) {
        if images.capacity() > 0 {
            // The loader thread has finished the epoch: nothing left to write into it.
            let _ = self.spare.send(images);
        }
    }
}

/// Image `i` of `store` with the test transform (resize to `size`, normalize), or why it
/// cannot be read.
pub fn test_image(store: &ImageStore, i: usize, size: usize, norm: Norm) -> Result<Vec<f32>, String> {
    let mut v = vec![0f32; 3 * size * size];
    test_image_into(store, i, size, &NormTable::new(norm), &mut v)?;
    Ok(v)
}

/// [`test_image`] into `out` (`3 * size * size` values).
pub fn test_image_into(store: &ImageStore, i: usize, size: usize, table: &NormTable, out: &mut [f32]) -> Result<(), String> {
    let img = store.pixels(i)?;
    let (w, h) = (img.width, img.height);
    if (w as usize, h as usize) == (size, size) {
        normalize_rgb_into(&img.data, size, size, false, table, out);
    } else {
        with_resizer(|r| {
            let px = r.resize_crop(&img.data, w, h, (0, 0, w, h), size as u32);
            normalize_rgb_into(px, size, size, false, table, out);
        });
    }
    Ok(())
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
        let errors: Vec<Option<String>> = (0..store.len()).into_par_iter().map(|i| store.pixels(i).err()).collect();
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
        assert!(self.size >= 1, "image size 0");
        let len = 3 * self.size * self.size;
        let table = NormTable::new(self.norm);
        let mut out = vec![0f32; indices.len() * len];
        let results: Vec<Result<(), String>> = out
            .par_chunks_mut(len)
            .zip(indices.par_iter())
            .map(|(o, &i)| test_image_into(&self.store, self.readable[i], self.size, &table, o))
            .collect();
        for (&i, r) in indices.iter().zip(results) {
            r.map_err(|why| anyhow::anyhow!("test image {} became unreadable: {why}", self.store.describe(self.readable[i])))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::augment::train_transform;
    use crate::data::images::normalize_into;
    use rand::RngCore;

    /// PNG files of random pixels at assorted sizes, with an unreadable file at `bad`.
    fn files(dir: &std::path::Path, bad: usize) -> Vec<PathBuf> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let sizes = [(64u32, 48u32), (31, 77), (40, 40), (50, 50), (17, 9), (100, 60), (7, 200)];
        sizes
            .iter()
            .enumerate()
            .map(|(i, &(w, h))| {
                let f = dir.join(format!("{i}.png"));
                if i == bad {
                    std::fs::write(&f, b"not a png").unwrap();
                } else {
                    let mut px = vec![0u8; 3 * (w * h) as usize];
                    rng.fill_bytes(&mut px);
                    RgbImage::from_raw(w, h, px).unwrap().save(&f).unwrap();
                }
                f
            })
            .collect()
    }

    fn loader(store: ImageStore) -> TrainLoader {
        let n = store.len();
        TrainLoader {
            store,
            targets: (0..2 * n).map(|t| (t % 3 == 0) as u8 as f32).collect(),
            k: 2,
            size: 32,
            norm: Norm::Clip,
            seed: 11,
        }
    }

    /// The batch on 1 thread and on 3 is the same, bit for bit, and each image in it is the
    /// image-level transform (`train_transform`, then `normalize_into`) with the image's own
    /// draws; the unreadable image is skipped and the others close up behind it.
    fn check(l: &TrainLoader, rgb: impl Fn(usize) -> RgbImage, bad: usize) {
        let idx = [5usize, bad, 0, 3, 1, 6, 4];
        let epoch = 3;
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| l.batch(&idx, epoch))
        };
        let (one, three) = (on(1), on(3));
        let bits = |b: &Batch| b.images.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one), bits(&three), "1 thread and 3 differ");
        // A handed-back buffer full of NaN, longer or shorter than the batch, leaves no trace.
        let len = 3 * l.size * l.size;
        for n in [idx.len() + 3, 2] {
            let reused = l.batch_into(&idx, epoch, vec![f32::NAN; n * len]);
            assert_eq!(bits(&reused), bits(&one), "a reused buffer of {n} images changes the batch");
        }
        assert_eq!(one.targets, three.targets);
        assert_eq!(one.n, idx.len() - 1);
        assert_eq!(one.skipped.len(), 1);
        assert_eq!(one.skipped[0].0, l.store.describe(bad));
        assert_eq!(one.images.len(), one.n * len);
        let epoch_seed = derive_seed(derive_seed(l.seed, AUGMENT_STREAM), epoch);
        for (j, &i) in idx.iter().filter(|&&i| i != bad).enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(epoch_seed, i as u64));
            let img = train_transform(&mut rng, &rgb(i), l.size as u32);
            let mut want = vec![0f32; len];
            normalize_into(&img, l.norm, &mut want);
            assert!(one.images[j * len..(j + 1) * len] == want[..], "image {i} (batch slot {j})");
            assert_eq!(one.targets[j * l.k..(j + 1) * l.k], l.targets[i * l.k..(i + 1) * l.k]);
        }
    }

    #[test]
    fn batches_do_not_depend_on_threads_and_match_the_image_transform() {
        let dir = tempfile::tempdir().unwrap();
        let bad = 2;
        let f = files(dir.path(), bad);
        let from_files = loader(ImageStore::Files(f.clone()));
        check(&from_files, |i| load_rgb_full(&f[i]).unwrap(), bad);

        // The same through a cache (40 px records, cropped and resized to 32): the unreadable
        // source's record holds no image, and the store still points at it.
        let items: crate::data::cache::Items = f.iter().map(|p| (p.clone(), vec![0])).collect();
        let cfile = dir.path().join("c.cache");
        crate::data::cache::prepare(&cfile, "t", &["a".into(), "b".into()], 40, &items, &Vec::new(), |_, _| {}).unwrap();
        let cache = Arc::new(Cache::open(&cfile).unwrap());
        assert_eq!(cache.records(crate::data::Split::Train).len(), f.len() - 1);
        let from_cache = loader(ImageStore::Cache {
            cache: Arc::clone(&cache),
            records: (0..f.len()).collect(),
        });
        check(&from_cache, |i| cache.rgb(i).unwrap(), bad);
    }

    #[test]
    fn an_epoch_stream_writing_into_handed_back_buffers_gives_the_same_batches() {
        let dir = tempfile::tempdir().unwrap();
        let l = Arc::new(loader(ImageStore::Files(files(dir.path(), 2))));
        let batches = vec![vec![0, 1, 3], vec![4, 5], vec![2, 6, 1], vec![3], vec![6, 5, 4, 0]];
        let stream = l.epoch(batches.clone(), 7);
        let mut held = Vec::new();
        for idx in &batches {
            stream.recycle(std::mem::take(&mut held));
            let got = stream.recv().unwrap();
            let want = l.batch(idx, 7);
            assert!(got.images == want.images, "batch {idx:?}");
            assert_eq!((got.n, &got.targets, &got.skipped), (want.n, &want.targets, &want.skipped));
            held = got.images;
        }
        assert!(stream.recv().is_err(), "the epoch has ended");
        stream.recycle(held);
    }
}
