//! Checkpoints: one safetensors file holding the trainable tensors, the optimizer state and
//! (when on) the EMA weights, with everything needed to rebuild the run as JSON strings in the
//! file's metadata. Written atomically: a temporary file in the same folder, fsync, rename.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::data::DataConfig;
use crate::model::{params::param_specs, Method, ModelConfig, NamedTensor, Params};
use crate::train::run::{BackboneSource, TrainConfig};

/// Value of the `format` metadata key; a file without it is not an mlvpt checkpoint.
pub const FORMAT: &str = "mlvpt-checkpoint";
pub const VERSION: &str = "1";

/// A float32 tensor as stored in a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Serializes named f32 tensors and string metadata into safetensors bytes. The `format` and
/// `version` keys are added here.
pub fn encode(tensors: &BTreeMap<String, RawTensor>, meta: &BTreeMap<String, String>) -> anyhow::Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        anyhow::ensure!(
            t.shape.iter().product::<usize>() == t.data.len(),
            "tensor {name}: shape {:?} does not match {} values",
            t.shape,
            t.data.len()
        );
        let bytes: &[u8] = bytemuck::cast_slice(&t.data);
        views.push((name.as_str(), TensorView::new(Dtype::F32, t.shape.clone(), bytes)?));
    }
    let mut info: HashMap<String, String> = meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    info.insert("format".into(), FORMAT.into());
    info.insert("version".into(), VERSION.into());
    Ok(safetensors::serialize(views, &Some(info))?)
}

/// Parses checkpoint bytes read from `origin` (named in errors). Rejects anything that is not
/// a well-formed safetensors file of float32 tensors carrying mlvpt's format tag.
pub fn decode(bytes: &[u8], origin: &Path) -> anyhow::Result<(BTreeMap<String, RawTensor>, BTreeMap<String, String>)> {
    let at = origin.display();
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("{at}: not a readable safetensors file ({e:?}); truncated or not a checkpoint?"))?;
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    match meta.get("format") {
        Some(f) if f == FORMAT => {}
        Some(f) => bail!("{at}: safetensors file of format {f:?}, not an mlvpt checkpoint"),
        None => bail!("{at}: safetensors file without mlvpt metadata (no \"format\" key): not an mlvpt checkpoint"),
    }
    match meta.get("version") {
        Some(v) if v == VERSION => {}
        v => bail!("{at}: checkpoint version {v:?} is not supported (this build reads version {VERSION})"),
    }
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("{at}: corrupt checkpoint ({e:?})"))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!("{at}: tensor {name} has dtype {:?}, expected F32", view.dtype());
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.insert(
            name,
            RawTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((tensors, meta))
}

/// Reads a whole checkpoint file.
pub fn read_file(path: &Path) -> anyhow::Result<(BTreeMap<String, RawTensor>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    decode(&bytes, path)
}

/// Replaces `path` with `bytes` so that a reader (or a crash) sees either the old file or the
/// new one, never a partial one: write a temporary file in the same folder, fsync it, rename it
/// over the target, then fsync the folder so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Directory fsync is a Unix notion; elsewhere opening a folder fails, which is harmless.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// A metadata entry that must be present.
pub fn require<'a>(meta: &'a BTreeMap<String, String>, key: &str, origin: &Path) -> anyhow::Result<&'a str> {
    meta.get(key)
        .map(String::as_str)
        .with_context(|| format!("{}: checkpoint metadata lacks {key:?}", origin.display()))
}

/// A metadata entry holding JSON, parsed into `T`.
pub fn require_json<T: serde::de::DeserializeOwned>(meta: &BTreeMap<String, String>, key: &str, origin: &Path) -> anyhow::Result<T> {
    let s = require(meta, key, origin)?;
    serde_json::from_str(s).with_context(|| format!("{}: checkpoint metadata {key:?} is malformed", origin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (BTreeMap<String, RawTensor>, BTreeMap<String, String>) {
        let mut t = BTreeMap::new();
        t.insert(
            "params/a".to_string(),
            RawTensor {
                shape: vec![2, 3],
                data: vec![1., -2., 3.5, f32::MIN_POSITIVE, 0., 6.],
            },
        );
        t.insert(
            "params/b".to_string(),
            RawTensor {
                shape: vec![1],
                data: vec![7.25],
            },
        );
        let mut m = BTreeMap::new();
        m.insert("epoch".to_string(), "3".to_string());
        (t, m)
    }

    #[test]
    fn round_trips_bit_for_bit() {
        let (t, m) = sample();
        let bytes = encode(&t, &m).unwrap();
        let (t2, m2) = decode(&bytes, Path::new("x")).unwrap();
        assert_eq!(t, t2);
        assert_eq!(m2.get("epoch").map(String::as_str), Some("3"));
        assert_eq!(m2.get("format").map(String::as_str), Some(FORMAT));
    }

    #[test]
    fn rejects_truncated_foreign_and_garbage() {
        let (t, m) = sample();
        let bytes = encode(&t, &m).unwrap();
        for cut in [0, 5, 8, 20, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], Path::new("x")).is_err(), "cut at {cut} accepted");
        }
        let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
        assert!(decode(&garbage, Path::new("x")).is_err());
        // A valid safetensors file that is not ours.
        let view = TensorView::new(Dtype::F32, vec![1], &[0u8; 4]).unwrap();
        let foreign = safetensors::serialize([("w", view)], &None).unwrap();
        let err = decode(&foreign, Path::new("f.safetensors")).unwrap_err().to_string();
        assert!(err.contains("f.safetensors") && err.contains("not an mlvpt checkpoint"), "{err}");
        // Wrong dtype.
        let view = TensorView::new(Dtype::F16, vec![2], &[0u8; 4]).unwrap();
        let info = Some(
            [
                ("format".to_string(), FORMAT.to_string()),
                ("version".to_string(), VERSION.to_string()),
            ]
            .into(),
        );
        let f16 = safetensors::serialize([("w", view)], &info).unwrap();
        assert!(decode(&f16, Path::new("x")).unwrap_err().to_string().contains("F16"));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(write_atomic(&dir.path().join("missing/c"), b"x").is_err());
    }

    #[test]
    fn metadata_helpers_name_the_key() {
        let (_, m) = sample();
        let e = require(&m, "seed", Path::new("ck")).unwrap_err().to_string();
        assert!(e.contains("seed") && e.contains("ck"));
        assert_eq!(require_json::<u64>(&m, "epoch", Path::new("ck")).unwrap(), 3);
        let mut bad = m.clone();
        bad.insert("epoch".into(), "{".into());
        assert!(require_json::<u64>(&bad, "epoch", Path::new("ck")).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// The typed layer: a whole training run's state.

/// Everything a checkpoint holds: enough to evaluate the model, and to resume training
/// exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct RunState {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub backbone: BackboneSource,
    /// Per branch, the label indices of each group (empty for plain VPT).
    pub partitions: Vec<Vec<Vec<usize>>>,
    pub class_names: Vec<String>,
    /// Completed epochs.
    pub epoch: usize,
    /// Completed optimizer steps.
    pub step: u64,
    pub params: Params,
    pub adam_m: Params,
    pub adam_v: Params,
    pub adam_step: u64,
    /// EMA weights and the number of updates behind them, when EMA is on.
    pub ema: Option<(Params, u64)>,
    /// The lines of `metrics.jsonl` written so far (one JSON record per evaluation), kept as
    /// text so a resumed run rewrites the file byte for byte.
    pub history: Vec<String>,
}

impl RunState {
    /// Label -> group table of each branch (what the model consumes).
    pub fn branch_tables(&self) -> Vec<Vec<usize>> {
        tables(&self.partitions, self.model.labels)
    }

    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut t = BTreeMap::new();
        let mut put = |prefix: &str, p: &Params| {
            for nt in &p.tensors {
                t.insert(
                    format!("{prefix}/{}", nt.name),
                    RawTensor {
                        shape: nt.shape.clone(),
                        data: nt.data.clone(),
                    },
                );
            }
        };
        put("params", &self.params);
        put("adam_m", &self.adam_m);
        put("adam_v", &self.adam_v);
        if let Some((e, _)) = &self.ema {
            put("ema", e);
        }
        let mut m = BTreeMap::new();
        m.insert("model_config".to_string(), serde_json::to_string(&self.model)?);
        m.insert("data_config".to_string(), serde_json::to_string(&self.data)?);
        m.insert("train_config".to_string(), serde_json::to_string(&self.train)?);
        m.insert("backbone".to_string(), serde_json::to_string(&self.backbone)?);
        m.insert("groups".to_string(), serde_json::to_string(&self.partitions)?);
        m.insert("class_names".to_string(), serde_json::to_string(&self.class_names)?);
        m.insert("epoch".to_string(), self.epoch.to_string());
        m.insert("step".to_string(), self.step.to_string());
        m.insert("seed".to_string(), self.train.seed.to_string());
        m.insert("adam_step".to_string(), self.adam_step.to_string());
        if let Some((_, n)) = &self.ema {
            m.insert("ema_updates".to_string(), n.to_string());
        }
        m.insert("history".to_string(), serde_json::to_string(&self.history)?);
        encode(&t, &m)
    }

    /// Writes the checkpoint atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// Reads and checks a checkpoint: every config valid, groups a partition of the labels,
    /// every tensor present with the shape the config implies, nothing extra.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let (mut tensors, meta) = read_file(path)?;
        let at = path.display().to_string();
        let model: ModelConfig = require_json(&meta, "model_config", path)?;
        let data: DataConfig = require_json(&meta, "data_config", path)?;
        let train: TrainConfig = require_json(&meta, "train_config", path)?;
        let backbone: BackboneSource = require_json(&meta, "backbone", path)?;
        let partitions: Vec<Vec<Vec<usize>>> = require_json(&meta, "groups", path)?;
        let class_names: Vec<String> = require_json(&meta, "class_names", path)?;
        let epoch: usize = require_json(&meta, "epoch", path)?;
        let step: u64 = require_json(&meta, "step", path)?;
        let adam_step: u64 = require_json(&meta, "adam_step", path)?;
        let history: Vec<String> = require_json(&meta, "history", path)?;

        let bad = |what: String| anyhow::anyhow!("{at}: {what}");
        data.validate().map_err(|e| bad(format!("data config: {e:#}")))?;
        train.validate().map_err(|e| bad(format!("train config: {e:#}")))?;
        let branches = partitions.len();
        model.validate(branches).map_err(|e| bad(format!("model config: {e}")))?;
        let k = model.labels;
        if class_names.len() != k {
            return Err(bad(format!("{} class names for K = {k} labels", class_names.len())));
        }
        if data.labels() != k {
            return Err(bad(format!("data has {} labels, model {k}", data.labels())));
        }
        if model.method == Method::MlVpt {
            for (s, p) in partitions.iter().enumerate() {
                check_partition(p, k, model.groups).map_err(|e| bad(format!("groups of branch {s}: {e}")))?;
            }
        }
        if epoch > train.epochs {
            return Err(bad(format!("epoch {epoch} is past the run's {} epochs", train.epochs)));
        }

        let mut take = |prefix: &str| -> anyhow::Result<Params> {
            let mut out = Vec::new();
            for (name, shape) in param_specs(&model, branches) {
                let key = format!("{prefix}/{name}");
                let t = tensors.remove(&key).ok_or_else(|| bad(format!("tensor {key} is missing")))?;
                if t.shape != shape {
                    return Err(bad(format!("tensor {key} has shape {:?}, the config implies {shape:?}", t.shape)));
                }
                out.push(NamedTensor { name, shape, data: t.data });
            }
            Ok(Params { tensors: out })
        };
        let params = take("params")?;
        let adam_m = take("adam_m")?;
        let adam_v = take("adam_v")?;
        let ema = match train.ema {
            Some(_) => Some((take("ema")?, require_json::<u64>(&meta, "ema_updates", path)?)),
            None => None,
        };
        if let Some(extra) = tensors.keys().next() {
            return Err(bad(format!("unexpected tensor {extra}")));
        }
        Ok(Self {
            model,
            data,
            train,
            backbone,
            partitions,
            class_names,
            epoch,
            step,
            params,
            adam_m,
            adam_v,
            adam_step,
            ema,
            history,
        })
    }
}

/// Label -> group tables from per-branch group lists.
pub fn tables(partitions: &[Vec<Vec<usize>>], k: usize) -> Vec<Vec<usize>> {
    partitions
        .iter()
        .map(|groups| {
            let mut t = vec![0usize; k];
            for (g, members) in groups.iter().enumerate() {
                for &l in members {
                    t[l] = g;
                }
            }
            t
        })
        .collect()
}

/// `groups` must split 0..k into exactly `t` non-empty groups.
fn check_partition(groups: &[Vec<usize>], k: usize, t: usize) -> Result<(), String> {
    if groups.len() != t {
        return Err(format!("{} groups, the config says T = {t}", groups.len()));
    }
    let mut seen = vec![false; k];
    for g in groups {
        if g.is_empty() {
            return Err("an empty group".into());
        }
        for &l in g {
            if l >= k || seen[l] {
                return Err(format!("label {l} is out of range or in two groups"));
            }
            seen[l] = true;
        }
    }
    if let Some(l) = seen.iter().position(|&s| !s) {
        return Err(format!("label {l} is in no group"));
    }
    Ok(())
}
