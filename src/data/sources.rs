//! Real datasets as lists of (image file, label indices): Pascal VOC 2007, COCO 2014 and a
//! generic manifest (CSV or JSON lines) with a classes file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use rayon::prelude::*;

use super::cache::Cache;
use super::images::{Norm, Skipped};
use super::loader::{test_image, ImageStore, TestLoader, TrainLoader};
use super::{Dataset, Split};

/// The 20 VOC classes in the standard order.
pub const VOC_CLASSES: [&str; 20] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// Where the files are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum Source {
    /// `root` is `VOCdevkit/VOC2007` (or `VOCdevkit`, holding it): trainval / test.
    Voc2007 { root: PathBuf },
    /// `root` holds `annotations/instances_{train,val}2014.json`, `train2014/`, `val2014/`.
    Coco2014 { root: PathBuf },
    /// Manifest files for each split (the test one defaults to every 5th training line).
    Manifest {
        train: PathBuf,
        test: Option<PathBuf>,
        classes: Option<PathBuf>,
    },
    /// A file made by `mlvpt prepare` (both splits, already resized).
    Cache { file: PathBuf },
}

/// A real dataset: its files, classes, and how images are prepared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageDataConfig {
    pub source: Source,
    pub classes: Vec<String>,
    pub image_size: usize,
    pub norm: Norm,
}

/// One split's listing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing {
    pub items: Vec<(PathBuf, Vec<usize>)>,
}

impl Listing {
    /// Items without any label (kept: they are negatives for every class).
    pub fn unlabelled(&self) -> usize {
        self.items.iter().filter(|(_, l)| l.is_empty()).count()
    }
}

/// What loading a split set aside or noticed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub split: String,
    pub listed: usize,
    pub unlabelled: usize,
    pub skipped: Vec<Skipped>,
}

impl LoadReport {
    /// Human-readable lines for the run's report file.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{}: {} images listed, {} skipped (unreadable), {} with no labels (kept)\n",
            self.split,
            self.listed,
            self.skipped.len(),
            self.unlabelled
        );
        for k in &self.skipped {
            s += &format!("  skipped {}: {}\n", k.path.display(), k.reason);
        }
        s
    }
}

impl ImageDataConfig {
    /// Parses `voc2007:PATH`, `coco2014:PATH` or `manifest:FILE[,classes=FILE][,test=FILE]` and
    /// reads the class list (checking that the files are there).
    pub fn parse(spec: &str, image_size: usize, norm: Norm) -> anyhow::Result<Self> {
        let (kind, rest) = spec.split_once(':').with_context(|| {
            format!("data {spec:?}: expected voc2007:PATH, coco2014:PATH, manifest:FILE[,classes=FILE][,test=FILE] or cache:FILE")
        })?;
        // Absolute paths, so a checkpoint's data config works from any folder.
        let abs =
            |p: &str| -> anyhow::Result<PathBuf> { std::fs::canonicalize(p).with_context(|| format!("data {spec:?}: {p} does not exist")) };
        let source = match kind {
            "voc2007" => Source::Voc2007 {
                root: abs(voc_root(Path::new(rest))?.to_str().unwrap_or(rest))?,
            },
            "coco2014" => Source::Coco2014 { root: abs(rest)? },
            "cache" => Source::Cache { file: abs(rest)? },
            "manifest" => {
                let mut parts = rest.split(',');
                let train = abs(parts.next().unwrap_or_default())?;
                let (mut test, mut classes) = (None, None);
                for p in parts {
                    match p.split_once('=') {
                        Some(("classes", f)) => classes = Some(abs(f)?),
                        Some(("test", f)) => test = Some(abs(f)?),
                        _ => bail!("data {spec:?}: unknown manifest option {p:?} (expected classes=FILE or test=FILE)"),
                    }
                }
                Source::Manifest { train, test, classes }
            }
            _ => bail!("data {spec:?}: unknown dataset kind {kind:?} (voc2007, coco2014, manifest or cache)"),
        };
        let classes = match &source {
            Source::Voc2007 { .. } => VOC_CLASSES.iter().map(|s| s.to_string()).collect(),
            Source::Coco2014 { root } => coco_classes(&read_coco(root, "val2014")?)?,
            Source::Cache { file } => Cache::open(file)?.header().classes.clone(),
            Source::Manifest {
                train, classes: Some(f), ..
            } => {
                ensure!(train.is_file(), "manifest {} does not exist", train.display());
                read_classes(f)?
            }
            Source::Manifest {
                train,
                test,
                classes: None,
            } => {
                // No classes file: every label seen, sorted.
                let mut seen = BTreeSet::new();
                for f in std::iter::once(train).chain(test.iter()) {
                    for (_, labels, _) in read_manifest(f)? {
                        seen.extend(labels);
                    }
                }
                seen.into_iter().collect()
            }
        };
        ensure!(!classes.is_empty(), "data {spec:?}: no classes");
        Ok(Self {
            source,
            classes,
            image_size,
            norm,
        })
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.image_size >= 1, "image size must be at least 1");
        ensure!(!self.classes.is_empty(), "the dataset has no classes");
        Ok(())
    }

    /// The files and labels of one split (not for a cache, which has no files).
    pub fn listing(&self, split: Split) -> anyhow::Result<Listing> {
        match &self.source {
            Source::Cache { file } => bail!("{}: a prepared cache has no image files to list", file.display()),
            Source::Voc2007 { root } => voc_listing(root, if split == Split::Train { "trainval" } else { "test" }),
            Source::Coco2014 { root } => {
                let name = if split == Split::Train { "train2014" } else { "val2014" };
                coco_listing(root, name, &read_coco(root, name)?)
            }
            Source::Manifest { train, test, .. } => {
                let file = match (split, test) {
                    (Split::Test, Some(t)) => t,
                    _ => train,
                };
                let mut items = Vec::new();
                for (i, (path, labels, line)) in read_manifest(file)?.into_iter().enumerate() {
                    // Without a test manifest, every 5th line is held out for testing.
                    if test.is_none() && ((i % 5 == 4) != (split == Split::Test)) {
                        continue;
                    }
                    let mut idx = Vec::with_capacity(labels.len());
                    for l in labels {
                        let Some(j) = self.classes.iter().position(|c| *c == l) else {
                            bail!("{}:{line}: class {l:?} is not in the classes file", file.display());
                        };
                        idx.push(j);
                    }
                    items.push((path, idx));
                }
                Ok(Listing { items })
            }
        }
    }

    /// Where a split's images are, their 0/1 targets `n x K`, and the load report so far
    /// (listed, unlabelled, and for a cache the images found unreadable when it was made).
    pub fn store(&self, split: Split) -> anyhow::Result<(ImageStore, Vec<f32>, LoadReport)> {
        let k = self.classes.len();
        let mut report = LoadReport {
            split: format!("{split:?}").to_lowercase(),
            ..Default::default()
        };
        let (store, targets) = match &self.source {
            Source::Cache { file } => {
                let cache = Arc::new(Cache::open(file)?);
                ensure!(
                    cache.header().classes == self.classes,
                    "{}: the cache's classes differ from the run's",
                    file.display()
                );
                let records = cache.records(split);
                let mut targets = Vec::with_capacity(records.len() * k);
                for &r in &records {
                    targets.extend(cache.labels(r).iter().map(|&b| b as f32));
                }
                let unreadable = cache.unreadable(split);
                report.listed = records.len() + unreadable;
                if unreadable > 0 {
                    report.skipped.push(Skipped {
                        path: file.clone(),
                        reason: format!(
                            "{unreadable} source images were unreadable when the cache was made (see {}.report.txt)",
                            file.display()
                        ),
                    });
                }
                (ImageStore::Cache { cache, records }, targets)
            }
            _ => {
                let listing = self.listing(split)?;
                report.listed = listing.items.len();
                let mut targets = vec![0f32; listing.items.len() * k];
                for (row, (_, labels)) in targets.chunks_exact_mut(k).zip(&listing.items) {
                    for &l in labels {
                        row[l] = 1.0;
                    }
                }
                (ImageStore::Files(listing.items.into_iter().map(|(p, _)| p).collect()), targets)
            }
        };
        report.unlabelled = targets.chunks_exact(k).filter(|r| r.iter().all(|&t| t < 0.5)).count();
        ensure!(!store.is_empty(), "the {} split of {} has no images", report.split, self.describe());
        Ok((store, targets, report))
    }

    /// Writes (or finishes) the cache `out` of both splits of `spec` at `image_size`.
    pub fn prepare_cache(
        spec: &str,
        out: &Path,
        image_size: usize,
        progress: impl FnMut(usize, usize),
    ) -> anyhow::Result<super::cache::PrepareSummary> {
        let c = Self::parse(spec, image_size, Norm::default())?;
        ensure!(!matches!(c.source, Source::Cache { .. }), "{spec}: already a cache");
        let train = c.listing(Split::Train)?.items;
        let test = c.listing(Split::Test)?.items;
        super::cache::prepare(out, spec, &c.classes, image_size, &train, &test, progress)
    }

    /// A short name of the data for messages.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Voc2007 { root } | Source::Coco2014 { root } => root.display().to_string(),
            Source::Manifest { train, .. } => train.display().to_string(),
            Source::Cache { file } => file.display().to_string(),
        }
    }

    /// Decodes one split into memory with the test transform (resize); unreadable images are
    /// skipped and reported. Evaluation streams instead ([`ImageDataConfig::test_loader`]).
    pub fn load(&self, split: Split) -> anyhow::Result<(Dataset, LoadReport)> {
        let (store, targets, mut report) = self.store(split)?;
        let (k, size) = (self.classes.len(), self.image_size);
        let decoded: Vec<Result<Vec<f32>, String>> = (0..store.len())
            .into_par_iter()
            .map(|i| test_image(&store, i, size, self.norm))
            .collect();
        let mut d = Dataset {
            n: 0,
            k,
            channels: 3,
            image_size: size,
            images: Vec::new(),
            targets: Vec::new(),
        };
        for (i, r) in decoded.into_iter().enumerate() {
            match r {
                Ok(v) => {
                    d.images.extend_from_slice(&v);
                    d.targets.extend_from_slice(&targets[i * k..(i + 1) * k]);
                    d.n += 1;
                }
                Err(reason) => report.skipped.push(Skipped {
                    path: PathBuf::from(store.describe(i)),
                    reason,
                }),
            }
        }
        ensure!(
            d.n > 0,
            "the {} split has no usable images ({} listed, all unreadable)",
            report.split,
            report.listed
        );
        Ok((d, report))
    }

    /// The test split as a streaming loader (test transform, batch by batch): every image is
    /// decoded once here to find the unreadable ones (reported), none is kept in memory.
    pub fn test_loader(&self) -> anyhow::Result<(TestLoader, LoadReport)> {
        let (store, targets, mut report) = self.store(Split::Test)?;
        let (loader, skipped) = TestLoader::open(store, &targets, self.classes.len(), self.image_size, self.norm);
        report.skipped.extend(skipped);
        ensure!(
            !loader.is_empty(),
            "the {} split has no usable images ({} listed, all unreadable)",
            report.split,
            report.listed
        );
        Ok((loader, report))
    }

    /// The training split as a streaming loader with augmentation (nothing decoded yet).
    pub fn train_loader(&self, seed: u64) -> anyhow::Result<(TrainLoader, LoadReport)> {
        let (store, targets, report) = self.store(Split::Train)?;
        Ok((
            TrainLoader {
                store,
                targets,
                k: self.classes.len(),
                size: self.image_size,
                norm: self.norm,
                seed,
            },
            report,
        ))
    }
}

/// Accepts `VOCdevkit/VOC2007` or a `VOCdevkit` folder holding `VOC2007`.
fn voc_root(p: &Path) -> anyhow::Result<PathBuf> {
    for cand in [p.to_path_buf(), p.join("VOC2007")] {
        if cand.join("ImageSets/Main").is_dir() {
            return Ok(cand);
        }
    }
    bail!("{}: not a VOC 2007 folder (no ImageSets/Main in it or in its VOC2007)", p.display())
}

fn voc_listing(root: &Path, set: &str) -> anyhow::Result<Listing> {
    let list = root.join("ImageSets/Main").join(format!("{set}.txt"));
    let text = std::fs::read_to_string(&list).with_context(|| format!("cannot read {}", list.display()))?;
    let mut items = Vec::new();
    for id in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let xml = root.join("Annotations").join(format!("{id}.xml"));
        let body = std::fs::read_to_string(&xml).with_context(|| format!("cannot read {}", xml.display()))?;
        let doc = roxmltree::Document::parse(&body).with_context(|| format!("{}: not valid XML", xml.display()))?;
        let mut labels = BTreeSet::new();
        // 'difficult' objects count as positives (ML-GCN's convention).
        for obj in doc.descendants().filter(|n| n.has_tag_name("object")) {
            let name = obj
                .children()
                .find(|n| n.has_tag_name("name"))
                .and_then(|n| n.text())
                .map(str::trim)
                .with_context(|| format!("{}: an <object> without <name>", xml.display()))?;
            let j = VOC_CLASSES
                .iter()
                .position(|c| *c == name)
                .with_context(|| format!("{}: unknown VOC class {name:?}", xml.display()))?;
            labels.insert(j);
        }
        items.push((root.join("JPEGImages").join(format!("{id}.jpg")), labels.into_iter().collect()));
    }
    Ok(Listing { items })
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnn>,
    categories: Vec<CocoCat>,
}
#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}
#[derive(Deserialize)]
struct CocoAnn {
    image_id: u64,
    category_id: u64,
}
#[derive(Deserialize)]
struct CocoCat {
    id: u64,
    name: String,
}

fn read_coco(root: &Path, name: &str) -> anyhow::Result<CocoFile> {
    let f = root.join("annotations").join(format!("instances_{name}.json"));
    let file = std::fs::File::open(&f).with_context(|| format!("cannot open {}", f.display()))?;
    serde_json::from_reader(std::io::BufReader::new(file)).with_context(|| format!("{}: not a COCO instances file", f.display()))
}

/// Category names in category-id order.
fn coco_classes(c: &CocoFile) -> anyhow::Result<Vec<String>> {
    let mut cats: Vec<&CocoCat> = c.categories.iter().collect();
    cats.sort_by_key(|c| c.id);
    Ok(cats.iter().map(|c| c.name.clone()).collect())
}

fn coco_listing(root: &Path, name: &str, c: &CocoFile) -> anyhow::Result<Listing> {
    let mut cats: Vec<u64> = c.categories.iter().map(|c| c.id).collect();
    cats.sort_unstable();
    let mut by_image: std::collections::HashMap<u64, BTreeSet<usize>> = Default::default();
    for a in &c.annotations {
        let j = cats
            .binary_search(&a.category_id)
            .map_err(|_| anyhow::anyhow!("instances_{name}.json: annotation with unknown category id {}", a.category_id))?;
        by_image.entry(a.image_id).or_default().insert(j);
    }
    let dir = root.join(name);
    ensure!(dir.is_dir(), "image folder {} does not exist", dir.display());
    let mut images: Vec<&CocoImage> = c.images.iter().collect();
    images.sort_by_key(|i| i.id);
    let items = images
        .into_iter()
        .map(|i| {
            (
                dir.join(&i.file_name),
                by_image.get(&i.id).map(|s| s.iter().copied().collect()).unwrap_or_default(),
            )
        })
        .collect();
    Ok(Listing { items })
}

/// One class name a line (blank lines ignored).
pub fn read_classes(f: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(f).with_context(|| format!("cannot read classes file {}", f.display()))?;
    let classes: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    let mut seen = BTreeSet::new();
    for c in &classes {
        ensure!(seen.insert(c), "classes file {}: class {c:?} is listed twice", f.display());
    }
    Ok(classes)
}

/// Reads a manifest: CSV `path,labels` (optional header; labels separated by `;` or `|`) or
/// JSON lines `{"path": .., "labels": [..]}`. Paths are relative to the manifest's folder.
/// Returns (path, label names, line number).
pub fn read_manifest(f: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<String>, usize)>> {
    let text = std::fs::read_to_string(f).with_context(|| format!("cannot read manifest {}", f.display()))?;
    let base = f.parent().unwrap_or(Path::new(""));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let (no, line) = (i + 1, line.trim());
        if line.is_empty() || (i == 0 && line.to_ascii_lowercase().starts_with("path,")) {
            continue;
        }
        let (path, labels): (String, Vec<String>) = if line.starts_with('{') {
            #[derive(Deserialize)]
            struct Row {
                path: String,
                #[serde(default)]
                labels: Vec<String>,
            }
            let r: Row = serde_json::from_str(line)
                .with_context(|| format!("{}:{no}: not a JSON object with \"path\" and \"labels\"", f.display()))?;
            (r.path, r.labels)
        } else {
            let (p, l) = line.split_once(',').unwrap_or((line, ""));
            let labels = l
                .split([';', '|'])
                .map(|s| s.trim().trim_matches('"'))
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            (p.trim().trim_matches('"').to_string(), labels)
        };
        ensure!(!path.is_empty(), "{}:{no}: empty image path", f.display());
        out.push((base.join(path), labels, no));
    }
    Ok(out)
}
