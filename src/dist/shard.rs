//! Which images each rank works on. Every rank computes the same epoch order (a function of
//! seed and epoch, `data::epoch_order`) and cuts it into the same global batches of
//! `batch_size` images (the run's batch is the global one); rank `r` of `w` steps on its part
//! of each: a contiguous split whose sizes differ by at most one, the first ranks taking the
//! extra images. A full batch of `w x b` images gives every rank `b`; the last, partial batch
//! is split the same way on every rank (a rank may get none, and still takes part in the step
//! with no images). The gradients are combined weighted by each rank's image count, so a step
//! is the mean over the global batch, as in a single process. Evaluation splits the test set
//! the same way and gathers the scores in rank order, which is the original order.

use std::ops::Range;

/// The part of `len` items that rank `rank` of `world` takes.
pub fn split(len: usize, rank: usize, world: usize) -> Range<usize> {
    assert!(world > 0 && rank < world, "rank {rank} of {world}");
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The most items any rank takes from a batch of `len`.
pub fn per_rank(len: usize, world: usize) -> usize {
    len.div_ceil(world)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_batch_in_order_and_differ_by_at_most_one() {
        for world in 1..6 {
            for len in 0..40 {
                let parts: Vec<Range<usize>> = (0..world).map(|r| split(len, r, world)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[world - 1].end, len);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
                assert!(parts.iter().all(|p| p.len() <= per_rank(len, world)));
            }
        }
        assert_eq!(split(16, 1, 2), 8..16);
        assert_eq!(split(5, 0, 2), 0..3);
        assert_eq!(split(1, 1, 2), 1..1);
    }
}
