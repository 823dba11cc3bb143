//! Label counts and pair counts (docs/MODEL.md#co-occurrence-counts), counted from sparse
//! per-image label lists so that millions of images with a few labels each cost O(sum of l^2),
//! never O(n K^2).

/// How often each label and each pair of labels occurs in a set of images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooccurrence {
    /// Number of labels K.
    pub k: usize,
    /// Number of images counted (images with no label included).
    pub n_images: u64,
    /// c_i: images holding label i (K entries).
    pub counts: Vec<u64>,
    /// C_ij: images holding both i and j, row-major K x K, symmetric; the diagonal holds c_i.
    pub pairs: Vec<u64>,
}

impl Cooccurrence {
    /// All-zero counts for `k` labels.
    pub fn empty(k: usize) -> Self {
        Self {
            k,
            n_images: 0,
            counts: vec![0; k],
            pairs: vec![0; k * k],
        }
    }

    /// Counts from one label list per image (label indices, each < `k`; repeats within one
    /// list count once).
    ///
    /// # Panics
    /// If a label index is `>= k` (callers map names to indices first, so this is a bug).
    pub fn from_label_lists<'a>(k: usize, lists: impl IntoIterator<Item = &'a [usize]>) -> Self {
        let mut co = Self::empty(k);
        let mut scratch = Vec::new();
        for list in lists {
            co.add_image(list, &mut scratch);
        }
        co
    }

    /// Counts from a dense row-major n x K 0/1 matrix; a value >= 0.5 counts as present.
    ///
    /// # Panics
    /// If `k == 0` or `labels.len()` is not a multiple of `k`.
    pub fn from_dense(k: usize, labels: &[f32]) -> Self {
        assert!(
            k > 0 && labels.len().is_multiple_of(k),
            "dense labels: length {} is not n * {k}",
            labels.len()
        );
        let mut co = Self::empty(k);
        let mut list = Vec::new();
        let mut scratch = Vec::new();
        for row in labels.chunks_exact(k) {
            list.clear();
            list.extend(row.iter().enumerate().filter(|(_, &v)| v >= 0.5).map(|(j, _)| j));
            co.add_image(&list, &mut scratch);
        }
        co
    }

    /// Adds one image; `scratch` is reused between calls to avoid an allocation per image.
    pub fn add_image(&mut self, labels: &[usize], scratch: &mut Vec<usize>) {
        scratch.clear();
        scratch.extend_from_slice(labels);
        scratch.sort_unstable();
        scratch.dedup();
        let k = self.k;
        for (a, &i) in scratch.iter().enumerate() {
            assert!(i < k, "label index {i} out of range for {k} labels");
            self.counts[i] += 1;
            self.pairs[i * k + i] += 1;
            for &j in &scratch[a + 1..] {
                self.pairs[i * k + j] += 1;
                self.pairs[j * k + i] += 1;
            }
        }
        self.n_images += 1;
    }

    /// C_ij.
    pub fn pair(&self, i: usize, j: usize) -> u64 {
        self.pairs[i * self.k + j]
    }

    /// Labels that occur in no image (c_i = 0): they have no edges and are left out of the
    /// spectral step (docs/MODEL.md#labels-that-never-occur).
    pub fn unused_labels(&self) -> Vec<usize> {
        (0..self.k).filter(|&i| self.counts[i] == 0).collect()
    }
}
