//! Agreement between two partitions of the same labels.

use std::collections::HashMap;

fn comb2(n: u64) -> f64 {
    (n as f64) * (n as f64 - 1.0) / 2.0
}

/// Adjusted Rand index (Hubert and Arabie) of two labelings of the same items, as
/// scikit-learn's `adjusted_rand_score`: 1 for identical partitions (up to renaming), about 0
/// for chance agreement. Degenerate cases where both are a single cluster, or both are all
/// singletons, count as perfect agreement (1).
///
/// # Panics
/// If the two slices differ in length.
pub fn adjusted_rand_index(a: &[usize], b: &[usize]) -> f64 {
    assert_eq!(a.len(), b.len(), "adjusted_rand_index: labelings differ in length");
    let n = a.len() as u64;
    let mut cells: HashMap<(usize, usize), u64> = HashMap::new();
    let mut rows: HashMap<usize, u64> = HashMap::new();
    let mut cols: HashMap<usize, u64> = HashMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *cells.entry((x, y)).or_default() += 1;
        *rows.entry(x).or_default() += 1;
        *cols.entry(y).or_default() += 1;
    }
    let index: f64 = cells.values().map(|&c| comb2(c)).sum();
    let sum_a: f64 = rows.values().map(|&c| comb2(c)).sum();
    let sum_b: f64 = cols.values().map(|&c| comb2(c)).sum();
    let total = comb2(n);
    if total == 0.0 {
        return 1.0;
    }
    let expected = sum_a * sum_b / total;
    let max = 0.5 * (sum_a + sum_b);
    if max == expected {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_up_to_renaming_is_one() {
        assert_eq!(adjusted_rand_index(&[0, 0, 1, 1, 2], &[5, 5, 3, 3, 9]), 1.0);
    }

    #[test]
    fn matches_a_hand_computed_case() {
        // sklearn: adjusted_rand_score([0,0,1,1],[0,0,1,2]) = 0.5714285714285715
        let v = adjusted_rand_index(&[0, 0, 1, 1], &[0, 0, 1, 2]);
        assert!((v - 4.0 / 7.0).abs() < 1e-12, "{v}");
        // Complete disagreement below chance: [0,0,1,1] vs [0,1,0,1] = -0.5
        let v = adjusted_rand_index(&[0, 0, 1, 1], &[0, 1, 0, 1]);
        assert!((v + 0.5).abs() < 1e-12, "{v}");
    }
}
