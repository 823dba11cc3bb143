//! A prepared dataset: every image of both splits decoded and resized once to `S x S` RGB8,
//! packed into one memory-mapped file so training reads pixels with no decoding.
//!
//! Layout: `MAGIC` (8 bytes), version u32 LE, header length u32 LE, the header as JSON
//! ([`CacheHeader`]), zero padding to [`ALIGN`]; then `n` fixed-size records:
//! state u8 (0 not written yet, 1 image, 2 unreadable source), split u8 (0 train, 1 test),
//! 2 zero bytes, CRC-32 u32 LE of the labels and pixels, `K` label bytes (0/1), `3 S S` pixels.
//! The file is allocated at full size first, so a truncated file is detected by its length;
//! a record torn by a crash or damaged later fails its CRC. `prepare` is resumable: records
//! already written with a good CRC are kept, the rest are (re)done.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use image::RgbImage;
use memmap2::{Mmap, MmapMut};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::images::load_rgb;
use super::Split;

pub const MAGIC: &[u8; 8] = b"MLVPTC\x00\x01";
pub const VERSION: u32 = 1;
/// Records start at a multiple of this.
pub const ALIGN: usize = 4096;
const RECORD_HEAD: usize = 8;
const STATE_EMPTY: u8 = 0;
const STATE_IMAGE: u8 = 1;
const STATE_UNREADABLE: u8 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheHeader {
    pub classes: Vec<String>,
    pub image_size: usize,
    /// Records: the training split's, then the test split's.
    pub n_train: usize,
    pub n_test: usize,
    /// The dataset spec it was made from.
    pub source: String,
    /// SHA-256 of the listed paths and labels: a resumed `prepare` must list the same items.
    pub listing_sha256: String,
}

impl CacheHeader {
    pub fn record_len(&self) -> usize {
        RECORD_HEAD + self.classes.len() + 3 * self.image_size * self.image_size
    }
    pub fn n(&self) -> usize {
        self.n_train + self.n_test
    }
}

/// An opened cache.
pub struct Cache {
    path: PathBuf,
    header: CacheHeader,
    data_start: usize,
    map: Mmap,
}

fn header_bytes(h: &CacheHeader) -> anyhow::Result<(Vec<u8>, usize)> {
    let json = serde_json::to_vec(h)?;
    let mut b = Vec::with_capacity(16 + json.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(json.len() as u32).to_le_bytes());
    b.extend_from_slice(&json);
    let start = b.len().div_ceil(ALIGN) * ALIGN;
    Ok((b, start))
}

/// Reads and checks the header; returns it and where the records start.
fn read_header(bytes: &[u8], path: &Path) -> anyhow::Result<(CacheHeader, usize)> {
    let at = path.display();
    ensure!(
        bytes.len() >= 16 && &bytes[..8] == MAGIC,
        "{at}: not an mlvpt image cache (bad magic)"
    );
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    ensure!(version == VERSION, "{at}: cache version {version}, this build reads {VERSION}");
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    ensure!(bytes.len() >= 16 + len, "{at}: truncated cache header");
    let h: CacheHeader = serde_json::from_slice(&bytes[16..16 + len]).with_context(|| format!("{at}: corrupt cache header"))?;
    let start = (16 + len).div_ceil(ALIGN) * ALIGN;
    let want = start + h.n() * h.record_len();
    ensure!(
        bytes.len() == want,
        "{at}: the cache is {} bytes but its header needs {want}: truncated or damaged (re-run mlvpt prepare)",
        bytes.len()
    );
    Ok((h, start))
}

fn record_crc(labels_and_pixels: &[u8]) -> u32 {
    crc32fast::hash(labels_and_pixels)
}

impl Cache {
    /// Opens a complete cache (every record written).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open cache {}", path.display()))?;
        // SAFETY: the file is only read; a concurrent writer could change pixels under us,
        // which the per-record CRC check on every read detects.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (header, data_start) = read_header(&map, path)?;
        let rl = header.record_len();
        let missing = (0..header.n()).filter(|&i| map[data_start + i * rl] == STATE_EMPTY).count();
        ensure!(
            missing == 0,
            "{}: the cache is incomplete ({missing} of {} images not written): re-run mlvpt prepare with the same arguments to finish it",
            path.display(),
            header.n()
        );
        Ok(Self {
            path: path.to_path_buf(),
            header,
            data_start,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn header(&self) -> &CacheHeader {
        &self.header
    }

    fn record(&self, i: usize) -> &[u8] {
        let rl = self.header.record_len();
        &self.map[self.data_start + i * rl..self.data_start + (i + 1) * rl]
    }

    /// Record indices of a split that hold an image (unreadable sources left out).
    pub fn records(&self, split: Split) -> Vec<usize> {
        let range = match split {
            Split::Train => 0..self.header.n_train,
            Split::Test => self.header.n_train..self.header.n(),
        };
        range.filter(|&i| self.record(i)[0] == STATE_IMAGE).collect()
    }

    /// Records of a split whose source image was unreadable when the cache was made.
    pub fn unreadable(&self, split: Split) -> usize {
        let range = match split {
            Split::Train => 0..self.header.n_train,
            Split::Test => self.header.n_train..self.header.n(),
        };
        range.filter(|&i| self.record(i)[0] == STATE_UNREADABLE).count()
    }

    /// The 0/1 labels of record `i`.
    pub fn labels(&self, i: usize) -> &[u8] {
        &self.record(i)[RECORD_HEAD..RECORD_HEAD + self.header.classes.len()]
    }

    /// The pixels of record `i` (`S x S` RGB8, rows packed), borrowed from the map after
    /// checking its CRC.
    pub fn pixels(&self, i: usize) -> anyhow::Result<&[u8]> {
        let r = self.record(i);
        ensure!(r[0] == STATE_IMAGE, "{}: record {i} holds no image", self.path.display());
        let crc = u32::from_le_bytes(r[4..8].try_into().unwrap());
        ensure!(
            record_crc(&r[RECORD_HEAD..]) == crc,
            "{}: record {i} is corrupt (CRC mismatch)",
            self.path.display()
        );
        Ok(&r[RECORD_HEAD + self.header.classes.len()..])
    }

    /// The image of record `i`, after checking its CRC (a copy of [`Cache::pixels`]).
    pub fn rgb(&self, i: usize) -> anyhow::Result<RgbImage> {
        let s = self.header.image_size as u32;
        RgbImage::from_raw(s, s, self.pixels(i)?.to_vec()).context("record size")
    }
}

/// What `prepare` did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrepareSummary {
    pub total: usize,
    /// Records already present from an earlier, interrupted run.
    pub reused: usize,
    pub written: usize,
    /// Unreadable source images (listed in the report file).
    pub unreadable: usize,
}

/// Items of both splits: (path, label indices).
pub type Items = Vec<(PathBuf, Vec<usize>)>;

/// Decodes and resizes `train` then `test` into the cache file `out` (parallel, resumable).
/// `chunk_done(done, total)` is called as records are written. Unreadable images are
/// recorded as such and appended, with the reason, to `out` + `.report.txt`.
pub fn prepare(
    out: &Path,
    source: &str,
    classes: &[String],
    image_size: usize,
    train: &Items,
    test: &Items,
    mut chunk_done: impl FnMut(usize, usize),
) -> anyhow::Result<PrepareSummary> {
    ensure!(image_size >= 1, "image size must be at least 1");
    let mut digest = sha2::Sha256::new();
    use sha2::Digest;
    for (p, l) in train.iter().chain(test) {
        digest.update(p.to_string_lossy().as_bytes());
        digest.update(format!("{l:?}\n").as_bytes());
    }
    let listing_sha256: String = digest.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let header = CacheHeader {
        classes: classes.to_vec(),
        image_size,
        n_train: train.len(),
        n_test: test.len(),
        source: source.to_string(),
        listing_sha256,
    };
    let (hbytes, start) = header_bytes(&header)?;
    let rl = header.record_len();
    let total_len = start + header.n() * rl;

    let resuming = out.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(out)
        .with_context(|| format!("cannot open {} for writing", out.display()))?;
    if resuming {
        let mut head = vec![0u8; hbytes.len().min(file.metadata()?.len() as usize)];
        use std::io::Read;
        (&file).read_exact(&mut head).ok();
        let len = file.metadata()?.len() as usize;
        if head != hbytes || len != total_len {
            bail!(
                "{} exists but was made from other data or settings (or is damaged): remove it to start over",
                out.display()
            );
        }
    } else {
        file.set_len(total_len as u64)
            .with_context(|| format!("cannot allocate {} bytes for {}", total_len, out.display()))?;
        (&file).write_all(&hbytes)?;
    }
    // SAFETY: this process owns the file while preparing; nothing else maps it for writing.
    let mut map = unsafe { MmapMut::map_mut(&file) }.with_context(|| format!("cannot map {}", out.display()))?;

    let items: Vec<(&PathBuf, &Vec<usize>, u8)> = train
        .iter()
        .map(|(p, l)| (p, l, 0u8))
        .chain(test.iter().map(|(p, l)| (p, l, 1u8)))
        .collect();
    let k = classes.len();
    let done = |r: &[u8]| -> bool {
        match r[0] {
            STATE_UNREADABLE => true,
            STATE_IMAGE => record_crc(&r[RECORD_HEAD..]) == u32::from_le_bytes(r[4..8].try_into().unwrap()),
            _ => false,
        }
    };
    let todo: Vec<usize> = map[start..]
        .par_chunks(rl)
        .enumerate()
        .filter(|(_, r)| !done(r))
        .map(|(i, _)| i)
        .collect();
    let mut summary = PrepareSummary {
        total: items.len(),
        reused: items.len() - todo.len(),
        ..Default::default()
    };
    chunk_done(summary.reused, summary.total);

    let report_path = PathBuf::from(format!("{}.report.txt", out.display()));
    const CHUNK: usize = 256;
    for chunk in todo.chunks(CHUNK) {
        let results: Vec<(usize, Result<Vec<u8>, String>)> = chunk
            .par_iter()
            .map(|&i| (i, load_rgb(items[i].0, image_size as u32).map(|img| img.into_raw())))
            .collect();
        let mut failures = String::new();
        for (i, r) in results {
            let rec = &mut map[start + i * rl..start + (i + 1) * rl];
            rec[1] = items[i].2;
            match r {
                Ok(px) => {
                    let body = &mut rec[RECORD_HEAD..];
                    body[..k].iter_mut().for_each(|b| *b = 0);
                    for &l in items[i].1 {
                        body[l] = 1;
                    }
                    body[k..].copy_from_slice(&px);
                    let crc = record_crc(body);
                    rec[4..8].copy_from_slice(&crc.to_le_bytes());
                    rec[0] = STATE_IMAGE;
                    summary.written += 1;
                }
                Err(why) => {
                    rec[0] = STATE_UNREADABLE;
                    failures += &format!("unreadable {}: {why}\n", items[i].0.display());
                    summary.unreadable += 1;
                }
            }
        }
        map.flush().with_context(|| format!("cannot write {}", out.display()))?;
        if !failures.is_empty() {
            let mut f = OpenOptions::new().create(true).append(true).open(&report_path)?;
            f.write_all(failures.as_bytes())?;
        }
        summary_progress(&mut chunk_done, &summary);
    }
    Ok(summary)
}

fn summary_progress(f: &mut impl FnMut(usize, usize), s: &PrepareSummary) {
    f(s.reused + s.written + s.unreadable, s.total);
}
