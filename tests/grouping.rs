//! Spectral label grouping (docs/MODEL.md#label-grouping): known structures, hand-derived
//! spectra, determinism, sparse vs dense counting, and the official ML-VPT groups.
#![cfg(feature = "train")]

use std::collections::BTreeSet;
use std::path::Path;

use mlvpt::grouping::input::{read_cooccurrence_json, LabelStats};
use mlvpt::grouping::{
    adjusted_rand_index, branches, correlative, discriminative, random_partition, Cooccurrence, GroupingConfig, GroupingError,
    GroupingMode, Partition,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn cfg(groups: usize) -> GroupingConfig {
    GroupingConfig {
        groups,
        ..Default::default()
    }
}

fn co_of(k: usize, lists: &[Vec<usize>]) -> Cooccurrence {
    Cooccurrence::from_label_lists(k, lists.iter().map(|l| l.as_slice()))
}

fn as_sets(groups: &[Vec<usize>]) -> BTreeSet<BTreeSet<usize>> {
    groups.iter().map(|g| g.iter().copied().collect()).collect()
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
    }
}

/// Images that each hold every label of one block.
fn clique_images(blocks: &[Vec<usize>], copies: usize) -> Vec<Vec<usize>> {
    (0..copies).flat_map(|_| blocks.iter().cloned()).collect()
}

#[test]
fn complete_graph_spectrum_is_zero_and_k_over_k_minus_1() {
    // Every image holds all 6 labels: S = 1 everywhere, M+ is the complete graph.
    let co = co_of(6, &clique_images(&[(0..6).collect()], 4));
    let p = correlative(&co, &cfg(3)).unwrap();
    let r = 6.0 / 5.0;
    assert_close(&p.eigenvalues, &[0.0, r, r, r]);
    assert_eq!(p.groups.len(), 3);
}

#[test]
fn disjoint_cliques_give_zero_with_multiplicity_of_components() {
    let blocks = vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]];
    let co = co_of(8, &clique_images(&blocks, 5));
    let p = correlative(&co, &cfg(3)).unwrap();
    // Three components: 0 three times, then the 3-clique's 3/2 (the 2-clique's is 2).
    assert_close(&p.eigenvalues, &[0.0, 0.0, 0.0, 1.5]);
    assert_eq!(p.groups, blocks);
    // Four smallest with T = 4: the fourth component-free value is still 1.5 (twice).
    let p = correlative(&co, &cfg(4)).unwrap();
    assert_close(&p.eigenvalues, &[0.0, 0.0, 0.0, 1.5, 1.5]);
}

#[test]
fn eigenvalues_are_all_k_when_k_is_below_t_plus_1() {
    let co = co_of(3, &clique_images(&[vec![0, 1, 2]], 2));
    let p = correlative(&co, &cfg(3)).unwrap();
    assert_close(&p.eigenvalues, &[0.0, 1.5, 1.5]);
    assert_eq!(p.groups, vec![vec![0], vec![1], vec![2]]);
}

/// Noisy blocks: each image picks a block and holds each of its labels with probability 0.7,
/// plus any other label with probability 0.01.
fn noisy_blocks(blocks: &[Vec<usize>], k: usize, n: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let b = &blocks[rng.random_range(0..blocks.len())];
            (0..k)
                .filter(|l| rng.random::<f64>() < if b.contains(l) { 0.7 } else { 0.01 })
                .collect()
        })
        .collect()
}

#[test]
fn correlative_recovers_noisy_blocks_exactly() {
    let blocks = vec![vec![0, 3, 6, 9, 12], vec![1, 4, 7, 10], vec![2, 5, 8, 11, 13, 14]];
    let co = co_of(15, &noisy_blocks(&blocks, 15, 3000, 7));
    let p = correlative(&co, &cfg(3)).unwrap();
    assert_eq!(as_sets(&p.groups), as_sets(&blocks));
}

#[test]
fn discriminative_recovers_mutually_exclusive_groups_exactly() {
    // Each image holds exactly one label of each group (like colour / shape / size): labels of
    // one group never co-occur, so M- is 1 inside a group and 1 - sqrt(~1/m) across groups.
    let groups = vec![vec![0, 1, 2], vec![3, 4, 5, 6], vec![7, 8]];
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let images: Vec<Vec<usize>> = (0..2000)
        .map(|_| groups.iter().map(|g| g[rng.random_range(0..g.len())]).collect())
        .collect();
    let co = co_of(9, &images);
    let p = discriminative(&co, &cfg(3)).unwrap();
    assert_eq!(as_sets(&p.groups), as_sets(&groups));
    // M+ there is complete multipartite; its correlative partition exists and is valid.
    let c = correlative(&co, &cfg(3)).unwrap();
    assert_eq!(c.groups.iter().map(Vec::len).sum::<usize>(), 9);
}

#[test]
fn deterministic_for_a_seed_and_any_thread_count() {
    let blocks = vec![vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9, 10, 11]];
    let co = co_of(12, &noisy_blocks(&blocks, 12, 500, 11));
    let c = GroupingConfig {
        groups: 4,
        restarts: 50,
        seed: 42,
        ..Default::default()
    };
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| (correlative(&co, &c).unwrap(), discriminative(&co, &c).unwrap()))
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
    assert_eq!(random_partition(12, 4, 9).unwrap(), random_partition(12, 4, 9).unwrap());
}

#[test]
fn sparse_counting_equals_dense_counting() {
    let (n, k) = (300, 17);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let dense: Vec<f32> = (0..n * k).map(|_| if rng.random::<f64>() < 0.2 { 1.0 } else { 0.0 }).collect();
    let lists: Vec<Vec<usize>> = dense.chunks(k).map(|r| (0..k).filter(|&j| r[j] == 1.0).rev().collect()).collect();
    let sparse = co_of(k, &lists);
    assert_eq!(sparse, Cooccurrence::from_dense(k, &dense));
    // The naive n x K x K loop.
    let mut pairs = vec![0u64; k * k];
    for r in dense.chunks(k) {
        for i in 0..k {
            for j in 0..k {
                if r[i] == 1.0 && r[j] == 1.0 {
                    pairs[i * k + j] += 1;
                }
            }
        }
    }
    assert_eq!(sparse.pairs, pairs);
    let counts: Vec<u64> = (0..k).map(|j| dense.chunks(k).filter(|r| r[j] == 1.0).count() as u64).collect();
    assert_eq!(sparse.counts, counts);
    assert_eq!(sparse.n_images, n as u64);
    // A repeated label in one image counts once.
    assert_eq!(co_of(3, &[vec![1, 1, 2]]), co_of(3, &[vec![2, 1]]));
}

#[test]
fn a_label_that_never_occurs_goes_to_the_smallest_group() {
    // Label 7 never occurs; blocks of sizes 4 and 3, so it joins the block of 3.
    let blocks = vec![vec![0, 1, 2, 3], vec![4, 5, 6]];
    let co = co_of(8, &clique_images(&blocks, 3));
    assert_eq!(co.unused_labels(), vec![7]);
    let p = correlative(&co, &cfg(2)).unwrap();
    assert_eq!(as_sets(&p.groups), as_sets(&[vec![0, 1, 2, 3], vec![4, 5, 6, 7]]));
    // The spectrum is of the 7 labels that occur.
    assert_close(&p.eigenvalues, &[0.0, 0.0, 4.0 / 3.0]);
}

#[test]
fn t_equal_one_and_t_equal_k() {
    let blocks = vec![vec![0, 1], vec![2, 3, 4]];
    let co = co_of(5, &clique_images(&blocks, 2));
    assert_eq!(correlative(&co, &cfg(1)).unwrap().groups, vec![vec![0, 1, 2, 3, 4]]);
    let p = discriminative(&co, &cfg(5)).unwrap();
    assert_eq!(p.groups, (0..5).map(|i| vec![i]).collect::<Vec<_>>());
}

#[test]
fn bad_settings_are_errors() {
    let co = co_of(4, &[vec![0, 1], vec![2, 3]]);
    assert_eq!(correlative(&co, &cfg(0)), Err(GroupingError::TooFewGroups(0)));
    assert_eq!(
        discriminative(&co, &cfg(5)),
        Err(GroupingError::MoreGroupsThanLabels { groups: 5, labels: 4 })
    );
    for tau in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let c = GroupingConfig {
            groups: 2,
            tau_dis: tau,
            ..Default::default()
        };
        assert!(matches!(
            discriminative(&co, &c),
            Err(GroupingError::BadTau { name: "tau_dis", .. })
        ));
    }
    assert_eq!(correlative(&Cooccurrence::empty(4), &cfg(2)), Err(GroupingError::EmptyLabels));
    let sparse = co_of(4, &[vec![0, 1]]);
    assert!(matches!(
        correlative(&sparse, &cfg(3)),
        Err(GroupingError::TooFewUsedLabels { used: 2, .. })
    ));
    assert!(random_partition(3, 4, 0).is_err());
    assert!(random_partition(3, 0, 0).is_err());
}

#[test]
fn random_partitions_are_balanced_and_differ_by_seed() {
    let p = random_partition(23, 5, 1).unwrap();
    let mut sizes: Vec<usize> = p.groups.iter().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(sizes, vec![4, 4, 5, 5, 5]);
    let all: BTreeSet<usize> = p.groups.iter().flatten().copied().collect();
    assert_eq!(all, (0..23).collect());
    assert_ne!(p, random_partition(23, 5, 2).unwrap());
}

#[test]
fn branches_follow_the_mode() {
    let blocks = vec![vec![0, 1, 2], vec![3, 4, 5]];
    let co = co_of(6, &noisy_blocks(&blocks, 6, 400, 1));
    let c = cfg(2);
    let both = branches(&co, GroupingMode::Both, &c).unwrap();
    assert_eq!(both, vec![correlative(&co, &c).unwrap(), discriminative(&co, &c).unwrap()]);
    assert_eq!(branches(&co, GroupingMode::Co, &c).unwrap(), vec![both[0].clone()]);
    assert_eq!(branches(&co, GroupingMode::Dc, &c).unwrap(), vec![both[1].clone()]);
    let r = branches(&co, GroupingMode::Random, &c).unwrap();
    assert_eq!(r, vec![random_partition(6, 2, 0).unwrap(), random_partition(6, 2, 1).unwrap()]);
    let l2g = both[0].label_to_group(6);
    for (g, members) in both[0].groups.iter().enumerate() {
        assert!(members.iter().all(|&l| l2g[l] == g));
    }
}

// ---- the official ML-VPT groups --------------------------------------------------------

fn data(name: &str) -> LabelStats {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
        .join("cooccurrence.json");
    read_cooccurrence_json(&path).unwrap()
}

fn official(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
        .join("official_groups.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn named_sets(classes: &[String], p: &Partition) -> BTreeSet<BTreeSet<String>> {
    p.groups.iter().map(|g| g.iter().map(|&i| classes[i].clone()).collect()).collect()
}

fn official_sets(v: &Value) -> BTreeSet<BTreeSet<String>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .collect()
}

#[test]
fn coco_official_correlative_groups_reproduce_exactly() {
    let LabelStats { classes, co } = data("coco2014");
    let off = official("coco2014");
    for t in [2, 3, 5, 8] {
        let p = correlative(&co, &cfg(t)).unwrap();
        assert_eq!(
            named_sets(&classes, &p),
            official_sets(&off[t.to_string()]["correlative"]),
            "T = {t}"
        );
    }
}

#[test]
fn coco_official_discriminative_groups_reproduce_exactly_for_t2_with_tau_3() {
    let LabelStats { classes, co } = data("coco2014");
    let off = official("coco2014");
    let c = GroupingConfig {
        groups: 2,
        tau_dis: 3.0,
        ..Default::default()
    };
    let p = discriminative(&co, &c).unwrap();
    assert_eq!(named_sets(&classes, &p), official_sets(&off["2"]["discriminative"]));
}

#[test]
fn voc_official_groups_reproduce_where_stable() {
    let LabelStats { classes, co } = data("voc2007");
    let off = official("voc2007");
    for t in [2, 3, 5, 8] {
        let p = correlative(&co, &cfg(t)).unwrap();
        assert_eq!(
            named_sets(&classes, &p),
            official_sets(&off[t.to_string()]["correlative"]),
            "T = {t}"
        );
    }
    for t in [2, 3, 5] {
        let p = discriminative(&co, &cfg(t)).unwrap();
        assert_eq!(
            named_sets(&classes, &p),
            official_sets(&off[t.to_string()]["discriminative"]),
            "T = {t}"
        );
    }
}

#[test]
fn adjusted_rand_index_is_one_only_for_the_same_partition() {
    let LabelStats { co, .. } = data("coco2014");
    let a = correlative(&co, &cfg(5)).unwrap().label_to_group(80);
    let b = correlative(&co, &cfg(8)).unwrap().label_to_group(80);
    let renamed: Vec<usize> = a.iter().map(|g| 4 - g).collect();
    assert_eq!(adjusted_rand_index(&a, &renamed), 1.0);
    assert!(adjusted_rand_index(&a, &b) < 1.0);
}
