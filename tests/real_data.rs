//! Real data and real backbones end to end: tiny VOC / COCO / manifest trees and timm-format
//! checkpoints written here, loaded by the library and trained on by the `mlvpt` binary.
#![cfg(feature = "train")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{ImageBuffer, Luma, Rgb};
use mlvpt::backend::{AugmentLayout, AugmentShape};
use mlvpt::data::sources::{ImageDataConfig, VOC_CLASSES};
use mlvpt::data::{Norm, Split};
use mlvpt::model::timm::{load_timm, resample_pos_embed};
use mlvpt::model::{Backbone, VitConfig};
use safetensors::tensor::{Dtype, TensorView};

fn mlvpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlvpt")).args(args).output().expect("run mlvpt")
}

fn ok(args: &[&str]) -> String {
    let o = mlvpt(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "mlvpt {args:?} failed:\n{err}");
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str], want: &str) {
    let o = mlvpt(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "mlvpt {args:?} succeeded");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(want), "expected {want:?} in:\n{err}");
}

/// A tiny ViT (patch 4, 16 px, D 16, 2 blocks, 2 heads) with LayerScale.
fn tiny_vit() -> VitConfig {
    VitConfig {
        image_size: 16,
        patch: 4,
        channels: 3,
        dim: 16,
        depth: 2,
        heads: 2,
        mlp_dim: 32,
        layer_scale: true,
        final_norm: true,
    }
}

/// Writes `b` as a timm safetensors file in `dtype` (F32 or BF16), plus `extra` tensors.
fn write_timm(path: &Path, b: &Backbone, dtype: Dtype, extra: &[(&str, Vec<usize>)], drop: &[&str]) {
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let enc = |data: &[f32]| -> Vec<u8> {
        match dtype {
            Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::BF16 => data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            _ => unreachable!(),
        }
    };
    for t in b.tensors() {
        if !drop.contains(&t.name.as_str()) {
            bufs.push((t.name.clone(), t.shape.clone(), enc(&t.data)));
        }
    }
    for (name, shape) in extra {
        let n: usize = shape.iter().product();
        bufs.push((name.to_string(), shape.clone(), enc(&vec![0.5; n])));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, s, d)| (n.clone(), TensorView::new(dtype, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

fn rgb(seed: u32, w: u32, h: u32) -> ImageBuffer<Rgb<u8>, Vec<u8>> {
    ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([(x * 13 + seed * 40) as u8, (y * 7 + seed * 90) as u8, (seed * 31) as u8])
    })
}

/// VOCdevkit/VOC2007 with 6 trainval and 4 test images; trainval image 0003 is corrupt,
/// 0004 is a grey PNG under a .jpg name, 0005 has no objects.
fn voc_tree(root: &Path) -> PathBuf {
    let voc = root.join("VOCdevkit/VOC2007");
    for d in ["ImageSets/Main", "Annotations", "JPEGImages"] {
        std::fs::create_dir_all(voc.join(d)).unwrap();
    }
    let ids: Vec<String> = (0..10).map(|i| format!("{i:06}")).collect();
    std::fs::write(voc.join("ImageSets/Main/trainval.txt"), ids[..6].join("\n") + "\n").unwrap();
    std::fs::write(voc.join("ImageSets/Main/test.txt"), ids[6..].join("\n") + "\n").unwrap();
    for (i, id) in ids.iter().enumerate() {
        let objects = if i == 5 {
            String::new()
        } else {
            let a = VOC_CLASSES[i % 20];
            let b = VOC_CLASSES[(i + 7) % 20];
            format!(
                "<object><name>{a}</name><difficult>0</difficult></object>\
                 <object><name>{b}</name><difficult>1</difficult></object>"
            )
        };
        std::fs::write(
            voc.join(format!("Annotations/{id}.xml")),
            format!("<annotation><filename>{id}.jpg</filename>{objects}</annotation>"),
        )
        .unwrap();
        let img = voc.join(format!("JPEGImages/{id}.jpg"));
        match i {
            3 => std::fs::write(&img, b"\xff\xd8 this is not a jpeg").unwrap(),
            4 => ImageBuffer::from_fn(20, 12, |x, _| Luma([(x * 10) as u8]))
                .save_with_format(&img, image::ImageFormat::Png)
                .unwrap(),
            _ => rgb(i as u32, 30 + i as u32, 20)
                .save_with_format(&img, image::ImageFormat::Jpeg)
                .unwrap(),
        }
    }
    voc
}

#[test]
fn voc_listing_counts_difficult_objects_and_skips_corrupt_images() {
    let dir = tempfile::tempdir().unwrap();
    voc_tree(dir.path());
    let c = ImageDataConfig::parse(&format!("voc2007:{}", dir.path().join("VOCdevkit").display()), 16, Norm::Imagenet).unwrap();
    assert_eq!(c.classes.len(), 20);
    let l = c.listing(Split::Train).unwrap();
    assert_eq!(l.items.len(), 6);
    assert_eq!(l.items[1].1, vec![1, 8]); // bicycle, and the difficult cow
    assert_eq!(l.unlabelled(), 1);
    let (d, r) = c.load(Split::Train).unwrap();
    assert_eq!((d.n, r.listed, r.skipped.len(), r.unlabelled), (5, 6, 1, 1));
    assert!(r.skipped[0].path.ends_with("000003.jpg"), "{:?}", r.skipped);
    assert_eq!(d.images.len(), 5 * 3 * 16 * 16);
    // The grey image has equal R, G, B before normalization.
    let (mean, std) = Norm::Imagenet.mean_std();
    let img = d.image(3);
    let px = |c: usize| img[c * 256 + 40] * std[c] + mean[c];
    assert!((px(0) - px(1)).abs() < 1e-5 && (px(1) - px(2)).abs() < 1e-5);
}

#[test]
fn sixteen_bit_png_and_manifest_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    ImageBuffer::from_fn(8, 8, |x, y| Rgb([(x * 8000) as u16, (y * 8000) as u16, 65535u16]))
        .save(p.join("a.png"))
        .unwrap();
    rgb(1, 9, 9).save(p.join("b.png")).unwrap();
    std::fs::write(p.join("classes.txt"), "cat\ndog\nsky\n").unwrap();
    std::fs::write(p.join("m.csv"), "path,labels\na.png,cat;sky\nb.png,dog|cat\n").unwrap();
    std::fs::write(
        p.join("t.jsonl"),
        "{\"path\": \"b.png\", \"labels\": [\"sky\"]}\n{\"path\": \"a.png\", \"labels\": []}\n",
    )
    .unwrap();
    let spec = format!(
        "manifest:{},classes={},test={}",
        p.join("m.csv").display(),
        p.join("classes.txt").display(),
        p.join("t.jsonl").display()
    );
    let c = ImageDataConfig::parse(&spec, 8, Norm::Clip).unwrap();
    let (tr, r) = c.load(Split::Train).unwrap();
    assert_eq!((tr.n, r.skipped.len()), (2, 0));
    assert_eq!(tr.targets, vec![1., 0., 1., 1., 1., 0.]);
    // 16-bit blue 65535 becomes 255.
    let (mean, std) = Norm::Clip.mean_std();
    assert!((tr.image(0)[2 * 64] * std[2] + mean[2] - 1.0).abs() < 1e-5);
    let (te, r) = c.load(Split::Test).unwrap();
    assert_eq!((te.n, r.unlabelled), (2, 1));
    assert_eq!(te.targets, vec![0., 0., 1., 0., 0., 0.]);

    std::fs::write(p.join("bad.csv"), "a.png,cat\nb.png,horse\n").unwrap();
    let spec = format!(
        "manifest:{},classes={}",
        p.join("bad.csv").display(),
        p.join("classes.txt").display()
    );
    let e = ImageDataConfig::parse(&spec, 8, Norm::Clip)
        .unwrap()
        .listing(Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.csv:2") && e.contains("horse"), "{e}");
    let e = ImageDataConfig::parse("voc2007:/no/such/dir", 8, Norm::Imagenet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/no/such/dir"), "{e}");
    let e = ImageDataConfig::parse(&format!("coco2014:{}", p.display()), 8, Norm::Imagenet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("instances_val2014.json"), "{e}");
}

#[test]
fn coco_categories_map_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("annotations")).unwrap();
    for (split, n) in [("train2014", 4u64), ("val2014", 3)] {
        std::fs::create_dir_all(p.join(split)).unwrap();
        let images: Vec<_> = (0..n)
            .map(|i| {
                let f = format!("COCO_{split}_{i:012}.jpg");
                rgb(i as u32, 24, 18).save(p.join(split).join(&f)).unwrap();
                serde_json::json!({"id": 100 + i, "file_name": f})
            })
            .collect();
        let anns: Vec<_> = (0..n)
            .map(|i| {
                let cat = [1, 7, 3][(i % 3) as usize];
                serde_json::json!({"image_id": 100 + i, "category_id": cat})
            })
            .collect();
        let j = serde_json::json!({"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]});
        std::fs::write(p.join(format!("annotations/instances_{split}.json")), j.to_string()).unwrap();
    }
    let c = ImageDataConfig::parse(&format!("coco2014:{}", p.display()), 8, Norm::Imagenet).unwrap();
    assert_eq!(c.classes, vec!["person", "car", "zebra"]);
    let l = c.listing(Split::Train).unwrap();
    let labels: Vec<Vec<usize>> = l.items.iter().map(|i| i.1.clone()).collect();
    assert_eq!(labels, vec![vec![0], vec![2], vec![1], vec![0]]);
}

#[test]
fn timm_checkpoints_load_in_f32_and_bf16_with_resampling() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backbone::random(&tiny_vit(), 3);
    let f32_file = dir.path().join("vit.safetensors");
    write_timm(
        &f32_file,
        &b,
        Dtype::F32,
        &[("head.weight", vec![5, 16]), ("head.bias", vec![5])],
        &[],
    );
    let (got, info) = load_timm(&f32_file, Some(2), None).unwrap();
    assert_eq!(got.config(), &tiny_vit());
    assert_eq!(got.tensors(), b.tensors());
    assert_eq!(info.ignored.len(), 2);

    let bf = dir.path().join("bf16.safetensors");
    write_timm(&bf, &b, Dtype::BF16, &[], &[]);
    let (got, _) = load_timm(&bf, Some(2), None).unwrap();
    for (x, y) in got.tensors().iter().zip(b.tensors()) {
        for (u, v) in x.data.iter().zip(&y.data) {
            assert!((u - v).abs() <= v.abs() / 128.0 + 1e-12, "{}: {u} vs {v}", x.name);
        }
    }

    // 16 px (grid 4) resampled to 24 px (grid 6).
    let (got, info) = load_timm(&f32_file, Some(2), Some(24)).unwrap();
    assert!(info.resampled && info.native_image_size == 16);
    assert_eq!(got.config().image_size, 24);
    let pe = got.get("pos_embed").unwrap();
    assert_eq!(pe.shape, vec![1, 37, 16]);
    assert_eq!(pe.data, resample_pos_embed(&b.get("pos_embed").unwrap().data, 16, 4, 6, true));

    // Bad files name the tensor.
    let miss = dir.path().join("miss.safetensors");
    write_timm(&miss, &b, Dtype::F32, &[], &["blocks.1.attn.proj.bias"]);
    let e = format!("{:#}", load_timm(&miss, Some(2), None).unwrap_err());
    assert!(e.contains("blocks.1.attn.proj.bias") && e.contains("missing"), "{e}");
    let odd = dir.path().join("odd.safetensors");
    write_timm(&odd, &b, Dtype::F32, &[("blocks.0.attn.q_norm.weight", vec![8])], &[]);
    let e = format!("{:#}", load_timm(&odd, Some(2), None).unwrap_err());
    assert!(e.contains("unexpected tensor blocks.0.attn.q_norm.weight"), "{e}");
    let e = format!("{:#}", load_timm(&f32_file, None, None).unwrap_err());
    assert!(e.contains("--heads"), "{e}");
    let e = format!("{:#}", load_timm(&f32_file, Some(2), Some(18)).unwrap_err());
    assert!(e.contains("not divisible"), "{e}");
}

/// The tiny run settings shared by the end-to-end tests.
const TINY: &[&str] = &[
    "--quiet",
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--groups",
    "2",
    "--experts",
    "1",
    "--heads",
    "2",
];

#[test]
fn train_eval_on_voc_and_manifest_with_a_timm_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    voc_tree(p);
    let b = Backbone::random(&tiny_vit(), 5);
    let w = p.join("vit.safetensors");
    write_timm(&w, &b, Dtype::BF16, &[], &[]);
    let out = p.join("run_voc");
    let mut a = vec![
        "train",
        "--out",
        out.to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
        "--image-size",
        "24",
    ];
    let data = format!("voc2007:{}", p.join("VOCdevkit/VOC2007").display());
    a.extend_from_slice(&["--data", &data]);
    a.extend_from_slice(TINY);
    let s = ok(&a);
    assert!(s.contains("test mAP"), "{s}");
    let report = std::fs::read_to_string(out.join("data_report.txt")).unwrap();
    // The corrupt training image is found while streaming, reported once.
    assert_eq!(report.matches("000003.jpg").count(), 1, "{report}");
    let ev = ok(&["eval", "--checkpoint", out.to_str().unwrap(), "--json"]);
    assert!(ev.contains("mAP"), "{ev}");

    // Another backbone file at the same path is refused unless allowed.
    write_timm(&w, &Backbone::random(&tiny_vit(), 6), Dtype::BF16, &[], &[]);
    fails(&["eval", "--checkpoint", out.to_str().unwrap()], "--allow-backbone-mismatch");
    ok(&["eval", "--checkpoint", out.to_str().unwrap(), "--allow-backbone-mismatch"]);

    // Predict on a folder (the corrupt image is skipped with a warning) and a single file.
    let jpegs = p.join("VOCdevkit/VOC2007/JPEGImages");
    let o = mlvpt(&[
        "predict",
        "--checkpoint",
        out.to_str().unwrap(),
        "--allow-backbone-mismatch",
        jpegs.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(table.starts_with("image,labels,aeroplane,bicycle"), "{table}");
    assert_eq!(table.lines().count(), 1 + 9, "{table}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("000003.jpg"));
    let one = jpegs.join("000007.jpg");
    let j = ok(&[
        "predict",
        "--checkpoint",
        out.to_str().unwrap(),
        "--allow-backbone-mismatch",
        "--json",
        one.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(j.trim()).unwrap();
    assert_eq!(v["probabilities"].as_object().unwrap().len(), 20);
    let p7 = v["probabilities"]["aeroplane"].as_f64().unwrap();
    assert!(p7 > 0.0 && p7 < 1.0);
    fails(&["predict", "--checkpoint", out.to_str().unwrap(), "/no/such.jpg"], "/no/such.jpg");

    // A backbone file of another architecture is refused even when allowed to differ.
    let other = VitConfig { depth: 1, ..tiny_vit() };
    write_timm(&w, &Backbone::random(&other, 6), Dtype::BF16, &[], &[]);
    fails(
        &["eval", "--checkpoint", out.to_str().unwrap(), "--allow-backbone-mismatch"],
        "depth: 1",
    );
    fails(&["train", "--weights", w.to_str().unwrap(), "--patch", "8"], "cannot be used with");

    // A manifest with no classes file, random backbone.
    let imgs = p.join("m");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut csv = String::from("path,labels\n");
    let mut labels: HashMap<usize, &str> = HashMap::new();
    labels.extend([(0, "a;b"), (1, "b"), (2, "c"), (3, ""), (4, "a|c")]);
    for i in 0..10 {
        rgb(i, 12, 12).save(imgs.join(format!("{i}.png"))).unwrap();
        csv += &format!("{i}.png,{}\n", labels[&(i as usize % 5)]);
    }
    std::fs::write(imgs.join("list.csv"), csv).unwrap();
    let out2 = p.join("run_m");
    let data = format!("manifest:{}", imgs.join("list.csv").display());
    let mut a = vec![
        "train",
        "--out",
        out2.to_str().unwrap(),
        "--data",
        &data,
        "--image-size",
        "8",
        "--patch",
        "4",
        "--dim",
        "8",
        "--depth",
        "1",
    ];
    a.extend_from_slice(TINY);
    ok(&a);
    let report = std::fs::read_to_string(out2.join("data_report.txt")).unwrap();
    // Interrupted after 1 epoch and resumed gives the same weights as an uninterrupted run
    // (augmentation draws depend on seed, epoch and image only).
    let out3 = p.join("run_m_resumed");
    let mut a = vec![
        "train",
        "--out",
        out3.to_str().unwrap(),
        "--data",
        &data,
        "--image-size",
        "8",
        "--patch",
        "4",
        "--dim",
        "8",
        "--depth",
        "1",
        "--stop-after",
        "1",
    ];
    a.extend_from_slice(TINY);
    ok(&a);
    ok(&["train", "--resume", out3.to_str().unwrap(), "--quiet"]);
    let whole = mlvpt::train::checkpoint::read_file(&out2.join("checkpoint.safetensors")).unwrap().0;
    let resumed = mlvpt::train::checkpoint::read_file(&out3.join("checkpoint.safetensors")).unwrap().0;
    assert!(whole.keys().any(|k| k.starts_with("params/")));
    assert_eq!(whole, resumed);
    assert!(
        report.contains("train: 8 images listed, 0 skipped") && report.contains("test: 2 images listed"),
        "{report}"
    );
    fails(
        &["train", "--data", "manifest:/no/such.csv", "--out", p.join("x").to_str().unwrap()],
        "/no/such.csv",
    );
    fails(
        &["train", "--weights", "/no/such.safetensors", "--out", p.join("x").to_str().unwrap()],
        "/no/such.safetensors",
    );
}

/// The loss of each epoch in a run's metrics.jsonl.
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn cache_prepare_resume_corruption_and_training() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    voc_tree(p);
    let data = format!("voc2007:{}", p.join("VOCdevkit").display());
    let cache = p.join("voc.cache");
    let out = ok(&[
        "prepare",
        "--data",
        &data,
        "--out",
        cache.to_str().unwrap(),
        "--image-size",
        "16",
        "--quiet",
    ]);
    assert!(
        out.contains("10 images (0 kept from an earlier run, 9 written, 1 unreadable"),
        "{out}"
    );
    // Its own rate: "10 images read in T s: R images/s on N threads (R/N per thread)".
    let rate = out
        .lines()
        .find(|l| l.starts_with("10 images read in "))
        .unwrap_or_else(|| panic!("no rate line:\n{out}"));
    assert!(rate.contains(" images/s on ") && rate.ends_with(" per thread)"), "{rate}");
    assert!(std::fs::read_to_string(format!("{}.report.txt", cache.display()))
        .unwrap()
        .contains("000003.jpg"));

    // The cache gives the same test pixels as decoding the files.
    let from_files = ImageDataConfig::parse(&data, 16, Norm::Imagenet)
        .unwrap()
        .load(Split::Test)
        .unwrap()
        .0;
    let c = ImageDataConfig::parse(&format!("cache:{}", cache.display()), 16, Norm::Imagenet).unwrap();
    assert_eq!(c.classes.len(), 20);
    let (from_cache, r) = c.load(Split::Test).unwrap();
    assert_eq!(r.listed, 4);
    assert_eq!(from_cache, from_files);
    let (loader, r) = c.train_loader(9).unwrap();
    assert_eq!((loader.len(), r.listed), (5, 6));
    // Augmentation is a function of (seed, epoch, index) only.
    let b1 = loader.batch(&[0, 2, 4], 1);
    assert_eq!(b1.n, 3);
    assert_eq!(b1.images, loader.batch(&[0, 2, 4], 1).images);
    assert_ne!(b1.images, loader.batch(&[0, 2, 4], 2).images);
    // `--augment-on device` draws the same crops and flips: its uint8 crops, resized by the
    // op's CPU twin in f32, give the host loader's images up to the host's uint8 rounding.
    let cb = loader.crop_batch(&[0, 2, 4], 1);
    assert_eq!((cb.n, cb.targets.clone()), (3, b1.targets.clone()));
    let (mean, std) = Norm::Imagenet.mean_std();
    let shape = AugmentShape {
        batch: 3,
        size: 16,
        layout: AugmentLayout::Images,
        mean,
        std,
    };
    let mut twin = vec![f32::NAN; shape.out_len()];
    mlvpt::ops::augment::cpu::augment(&cb.pixels, &cb.crops, &mut twin, &shape);
    let worst = twin.iter().zip(&b1.images).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("host vs device augmentation: largest difference {worst}");
    assert!(worst <= 1.01 / 255.0 / 0.224, "{worst}");

    // A damaged record is detected and redone by a second prepare; nothing else is.
    let mut bytes = std::fs::read(&cache).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff; // inside the last record's pixels
    std::fs::write(&cache, &bytes).unwrap();
    let e = ImageDataConfig::parse(&format!("cache:{}", cache.display()), 16, Norm::Imagenet)
        .unwrap()
        .load(Split::Test)
        .unwrap()
        .1;
    assert!(e.skipped.iter().any(|s| s.reason.contains("CRC")), "{e:?}");
    let out = ok(&[
        "prepare",
        "--data",
        &data,
        "--out",
        cache.to_str().unwrap(),
        "--image-size",
        "16",
        "--quiet",
    ]);
    assert!(out.contains("(9 kept from an earlier run, 1 written, 0 unreadable"), "{out}");
    // An interrupted prepare (a record never written) is incomplete until prepare finishes it.
    let mut bytes = std::fs::read(&cache).unwrap();
    let h = mlvpt::data::cache::Cache::open(&cache).unwrap().header().clone();
    let start = bytes.len() - h.n() * h.record_len();
    bytes[start + 2 * h.record_len()] = 0; // record 2's state: not written
    std::fs::write(&cache, &bytes).unwrap();
    let e = mlvpt::data::cache::Cache::open(&cache).err().unwrap().to_string();
    assert!(e.contains("incomplete (1 of 10"), "{e}");
    let out = ok(&[
        "prepare",
        "--data",
        &data,
        "--out",
        cache.to_str().unwrap(),
        "--image-size",
        "16",
        "--quiet",
    ]);
    assert!(out.contains("(9 kept from an earlier run, 1 written, 0 unreadable"), "{out}");
    mlvpt::data::cache::Cache::open(&cache).unwrap();
    // Other settings on an existing cache are refused.
    fails(
        &["prepare", "--data", &data, "--out", cache.to_str().unwrap(), "--image-size", "8"],
        "remove it",
    );

    // Training reads it.
    let run = p.join("run_cache");
    let cache_spec = format!("cache:{}", cache.display());
    let mut a = vec![
        "train",
        "--out",
        run.to_str().unwrap(),
        "--data",
        &cache_spec,
        "--image-size",
        "16",
        "--patch",
        "4",
        "--dim",
        "8",
        "--depth",
        "1",
    ];
    a.extend_from_slice(TINY);
    assert!(ok(&a).contains("test mAP"));
    // The same run with the augmentation on the backend (here the CPU's twin of the kernel):
    // the images differ from the host's by its uint8 rounding only, so the losses agree closely.
    let run_dev = p.join("run_cache_device");
    a[2] = run_dev.to_str().unwrap();
    a.extend_from_slice(&["--augment-on", "device"]);
    assert!(ok(&a).contains("test mAP"));
    for (h, d) in losses(&run).iter().zip(losses(&run_dev)) {
        assert!((h - d).abs() <= 1e-3 * h.abs(), "loss {h} (host augmentation) vs {d} (device)");
    }

    // A truncated cache is an error naming it.
    let bytes = std::fs::read(&cache).unwrap();
    std::fs::write(&cache, &bytes[..bytes.len() - 100]).unwrap();
    fails(&["train", "--data", &cache_spec, "--out", run.to_str().unwrap()], "truncated");
}

#[test]
fn cmyk_jpeg_decodes_to_rgb() {
    // tests/data/cmyk.jpg: 8x6, RGB (200, 40, 10) converted to CMYK and saved by Pillow
    // (Adobe-style inverted CMYK, as Photoshop writes it).
    let img = mlvpt::data::images::load_rgb_full(Path::new("tests/data/cmyk.jpg")).unwrap();
    assert_eq!(img.dimensions(), (8, 6));
    let p = img.get_pixel(3, 3);
    for (got, want) in p.0.iter().zip([200u8, 40, 10]) {
        assert!((*got as i32 - want as i32).abs() <= 6, "{:?} vs (200, 40, 10)", p.0);
    }
}

/// Evaluation streams the test split batch by batch; its metrics, probabilities and report
/// must be exactly those of the old path that decoded the whole split into memory first.
#[test]
fn streamed_evaluation_equals_the_whole_split_in_memory() {
    use mlvpt::data::DataConfig;
    use mlvpt::train::run::Opened;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (mut train, mut test) = (String::from("path,labels\n"), String::from("path,labels\n"));
    let labels = ["a;b", "b", "c", "", "a|c", "b;c"];
    for i in 0..24u32 {
        let name = format!("{i}.png");
        rgb(i, 10 + i % 5, 9 + i % 3).save(p.join(&name)).unwrap();
        let row = format!("{name},{}\n", labels[i as usize % labels.len()]);
        if i < 10 {
            train += &row
        } else {
            test += &row
        }
    }
    // Test image 5 (15.png) is corrupt: it is left out, so the batches of 4 straddle it.
    std::fs::write(p.join("15.png"), b"not a png").unwrap();
    std::fs::write(p.join("train.csv"), train).unwrap();
    std::fs::write(p.join("test.csv"), test).unwrap();
    std::fs::write(p.join("classes.txt"), "a\nb\nc\n").unwrap();
    let data = format!(
        "manifest:{},test={},classes={}",
        p.join("train.csv").display(),
        p.join("test.csv").display(),
        p.join("classes.txt").display()
    );
    let out = p.join("run");
    let mut a = vec![
        "train",
        "--out",
        out.to_str().unwrap(),
        "--data",
        &data,
        "--image-size",
        "8",
        "--patch",
        "4",
        "--dim",
        "8",
        "--depth",
        "1",
        "--ema",
        "0.9",
    ];
    a.extend_from_slice(TINY);
    ok(&a);
    let report = std::fs::read_to_string(out.join("data_report.txt")).unwrap();
    assert!(
        report.contains("test: 14 images listed, 1 skipped") && report.contains("15.png"),
        "{report}"
    );

    let mut o = Opened::open(&out).unwrap();
    let DataConfig::Images(c) = o.state.data.clone() else {
        panic!("not an image run")
    };
    let (d, r) = c.load(Split::Test).unwrap();
    assert_eq!(c.test_loader().unwrap().1, r);
    assert_eq!((o.test.len(), d.n), (13, 13));
    assert_eq!(o.test.targets(), &d.targets[..]);
    assert_eq!(o.test.constant_map(), mlvpt::data::constant_predictor_map(&d));

    // The old path: probabilities of the decoded split in consecutive batches.
    let bs = o.state.train.batch_size;
    let sigmoid = |x: &f32| 1.0 / (1.0 + (-x).exp());
    let old = |o: &mut Opened, images: &[f32]| -> Vec<f32> {
        images
            .chunks(bs * d.image_len())
            .flat_map(|x| o.trainer.predict(x).unwrap().iter().map(sigmoid).collect::<Vec<f32>>())
            .collect()
    };
    let th = o.state.train.threshold;
    let (m, e) = o.evaluate().unwrap();
    let want = mlvpt::metrics::evaluate(&old(&mut o, &d.images), &d.targets, d.n, d.k, th);
    assert_eq!(format!("{m:?}"), format!("{want:?}"));
    let shadow = o.state.ema.clone().unwrap().0;
    o.trainer.set_params(&shadow).unwrap();
    let old_ema = old(&mut o, &d.images);
    let want_ema = mlvpt::metrics::evaluate(&old_ema, &d.targets, d.n, d.k, th);
    o.trainer.set_params(&o.state.params.clone()).unwrap();
    assert_eq!(format!("{:?}", e.unwrap()), format!("{want_ema:?}"));
    // Both sets of weights are scored in one pass; the trainer keeps its own.
    let all: Vec<usize> = (0..d.n).collect();
    let (pr, pe) = mlvpt::train::run::test_probabilities(&mut o.trainer, &o.test, &all, bs, Some(&shadow)).unwrap();
    assert_eq!(pe.unwrap(), old_ema);
    assert_ne!(pr, old_ema, "the EMA weights should score differently");
    assert_eq!(pr, old(&mut o, &d.images));

    // predict --index picks readable test images by position, as before.
    let pick = [12, 0, 6, 5, 7];
    let (idx, probs) = o.predict(&pick, false).unwrap();
    assert_eq!(idx, pick);
    assert_eq!(probs, old(&mut o, &d.subset(&pick).images));
    assert!(o.predict(&[13], false).unwrap_err().to_string().contains("13 images"));

    // The CLI reports the same.
    let j: serde_json::Value = serde_json::from_str(&ok(&["eval", "--checkpoint", out.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(j["images"], 13);
    assert_eq!(j["metrics"]["mAP"].as_f64().unwrap(), m.map);
}
