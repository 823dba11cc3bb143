//! Broken checkpoints give errors, never panics: `eval`, `predict` and `train --resume` on
//! random bytes, truncated files, foreign safetensors, missing tensors or metadata, wrong shapes.
#![cfg(feature = "train")]

use std::path::Path;
use std::process::Command;

use mlvpt::train::checkpoint::{encode, read_file};

const TINY: &[&str] = &[
    "--image-size",
    "16",
    "--patch",
    "4",
    "--dim",
    "16",
    "--depth",
    "1",
    "--heads",
    "2",
    "--labels",
    "6",
    "--groups",
    "2",
    "--experts",
    "1",
    "--train-images",
    "32",
    "--test-images",
    "8",
    "--batch-size",
    "16",
    "--epochs",
    "1",
];

/// Every command that reads a checkpoint fails on `file` with `want` in its message.
fn all_reject(file: &Path, want: &str) {
    let f = file.to_str().unwrap();
    for args in [
        vec!["eval", "--checkpoint", f],
        vec!["eval", "--checkpoint", f, "--json"],
        vec!["predict", "--checkpoint", f, "--index", "0"],
        vec!["train", "--quiet", "--resume", f],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_mlvpt")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} accepted {}", file.display());
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
        assert!(
            err.starts_with("error:") && err.contains(want),
            "{args:?}: expected {want:?} in:\n{err}"
        );
    }
}

/// Trains [`TINY`] into `dir/run` and returns that folder.
fn train_tiny(dir: &Path) -> std::path::PathBuf {
    let run = dir.join("run");
    let mut a = vec!["train", "--quiet", "--out", run.to_str().unwrap()];
    a.extend_from_slice(TINY);
    let o = Command::new(env!("CARGO_BIN_EXE_mlvpt")).args(&a).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run
}

#[test]
fn broken_checkpoints_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = train_tiny(dir.path());
    let good = run.join("checkpoint.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    let put = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };

    all_reject(&dir.path().join("absent.safetensors"), "cannot read checkpoint");
    all_reject(&put("empty", b""), "not a readable safetensors file");
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    all_reject(&put("noise", &noise), "not a readable safetensors file");
    all_reject(&put("head_only", &bytes[..100]), "not a readable safetensors file");
    all_reject(&put("truncated", &bytes[..bytes.len() - 10]), "truncated or not a checkpoint");

    // A valid safetensors file of someone else's.
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &[0u8; 8]).unwrap();
    all_reject(
        &put("foreign", &safetensors::serialize([("weight", view)], &None).unwrap()),
        "not an mlvpt checkpoint",
    );

    let (tensors, meta) = read_file(&good).unwrap();
    let mut m = meta.clone();
    m.remove("model_config");
    all_reject(&put("no_config", &encode(&tensors, &m).unwrap()), "lacks \"model_config\"");
    let mut m = meta.clone();
    m.insert("groups".into(), "[[[0,1,2],[3,4]],[[0],[1,2,3,4,5]]]".into());
    all_reject(&put("bad_groups", &encode(&tensors, &m).unwrap()), "label 5 is in no group");
    let mut m = meta.clone();
    m.insert("train_config".into(), "{\"epochs\": 2}".into());
    all_reject(
        &put("bad_train_config", &encode(&tensors, &m).unwrap()),
        "\"train_config\" is malformed",
    );

    let mut t = tensors.clone();
    t.remove("adam_v/prompts");
    all_reject(
        &put("missing_tensor", &encode(&t, &meta).unwrap()),
        "tensor adam_v/prompts is missing",
    );
    let mut t = tensors.clone();
    let p = t.get_mut("params/prompts").unwrap();
    p.shape = vec![p.data.len()];
    all_reject(&put("wrong_shape", &encode(&t, &meta).unwrap()), "tensor params/prompts has shape");
    let mut t = tensors.clone();
    t.insert(
        "params/extra".into(),
        mlvpt::train::checkpoint::RawTensor {
            shape: vec![1],
            data: vec![0.0],
        },
    );
    all_reject(&put("extra_tensor", &encode(&t, &meta).unwrap()), "unexpected tensor params/extra");

    // The untouched file still works, so the failures above are the damage's doing.
    let o = Command::new(env!("CARGO_BIN_EXE_mlvpt"))
        .args(["eval", "--checkpoint", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `eval` and `predict` with `--batch-size` smaller than the training batch (a data-parallel
/// run's global batch may not fit one device) give the same scores, up to float rounding.
#[test]
fn eval_and_predict_take_a_smaller_batch() {
    let dir = tempfile::tempdir().unwrap();
    let run = train_tiny(dir.path());
    let f = run.to_str().unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let o = Command::new(env!("CARGO_BIN_EXE_mlvpt")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let map = |v: &serde_json::Value| v["metrics"]["mAP"].as_f64().unwrap();
    let (full, small) = (
        json(&["eval", "--checkpoint", f, "--json"]),
        json(&["eval", "--checkpoint", f, "--json", "--batch-size", "3"]),
    );
    assert!((map(&full) - map(&small)).abs() < 1e-6, "{full}\n{small}");
    let scores = |v: &serde_json::Value| -> Vec<f64> {
        let mut s = Vec::new();
        for img in v.as_array().unwrap() {
            for x in img["probabilities"].as_object().unwrap().values() {
                s.push(x.as_f64().unwrap());
            }
        }
        s
    };
    let idx = ["predict", "--checkpoint", f, "--json", "--index", "0", "1", "2", "3", "4"];
    let (p_full, p_small) = (json(&idx), json(&[&idx[..], &["--batch-size", "2"]].concat()));
    let (x, y) = (scores(&p_full), scores(&p_small));
    assert_eq!(x.len(), 5 * 6, "{p_full}");
    assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-6), "{p_full}\n{p_small}");
    for args in [vec!["eval", "--checkpoint", f], vec!["predict", "--checkpoint", f, "--index", "0"]] {
        let o = Command::new(env!("CARGO_BIN_EXE_mlvpt"))
            .args(&args)
            .args(["--batch-size", "0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--batch-size"),
            "{args:?} --batch-size 0:\n{err}"
        );
    }
}
