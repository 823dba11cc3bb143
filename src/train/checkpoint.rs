//! Checkpoints: one safetensors file holding the trainable tensors, the optimizer state and
//! (when on) the EMA weights, with everything needed to rebuild the run as JSON strings in the
//! file's metadata. Written atomically: a temporary file in the same folder, fsync, rename.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

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
    let meta: BTreeMap<String, String> =
        header.metadata().clone().unwrap_or_default().into_iter().collect();
    match meta.get("format") {
        Some(f) if f == FORMAT => {}
        Some(f) => bail!("{at}: safetensors file of format {f:?}, not an mlvpt checkpoint"),
        None => bail!("{at}: safetensors file without mlvpt metadata (no \"format\" key): not an mlvpt checkpoint"),
    }
    match meta.get("version") {
        Some(v) if v == VERSION => {}
        v => bail!("{at}: checkpoint version {v:?} is not supported (this build reads version {VERSION})"),
    }
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{at}: corrupt checkpoint ({e:?})"))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!("{at}: tensor {name} has dtype {:?}, expected F32", view.dtype());
        }
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        tensors.insert(name, RawTensor { shape: view.shape().to_vec(), data });
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
pub fn require_json<T: serde::de::DeserializeOwned>(
    meta: &BTreeMap<String, String>,
    key: &str,
    origin: &Path,
) -> anyhow::Result<T> {
    let s = require(meta, key, origin)?;
    serde_json::from_str(s).with_context(|| format!("{}: checkpoint metadata {key:?} is malformed", origin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (BTreeMap<String, RawTensor>, BTreeMap<String, String>) {
        let mut t = BTreeMap::new();
        t.insert("params/a".to_string(), RawTensor { shape: vec![2, 3], data: vec![1., -2., 3.5, f32::MIN_POSITIVE, 0., 6.] });
        t.insert("params/b".to_string(), RawTensor { shape: vec![1], data: vec![7.25] });
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
        let info = Some([("format".to_string(), FORMAT.to_string()), ("version".to_string(), VERSION.to_string())].into());
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
