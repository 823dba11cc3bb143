//! The CPU twins' parallelism: rayon's prelude with the `fast-cpu` feature, otherwise the same
//! method names on plain slice iterators, run in order on the calling thread. The twins split
//! work into tasks that write disjoint outputs and fix every reduction order inside a task, so
//! both give the same bits.

#[cfg(feature = "fast-cpu")]
pub(crate) use rayon::current_num_threads;
#[cfg(feature = "fast-cpu")]
pub(crate) use rayon::prelude::*;

#[cfg(not(feature = "fast-cpu"))]
pub(crate) use sequential::*;

#[cfg(not(feature = "fast-cpu"))]
mod sequential {
    /// One thread: the calling one.
    pub(crate) fn current_num_threads() -> usize {
        1
    }

    /// rayon's `ParallelSlice` methods the twins use, as `std` iterators.
    pub(crate) trait ParallelSlice<T> {
        fn par_chunks(&self, chunk_size: usize) -> std::slice::Chunks<'_, T>;
    }

    impl<T> ParallelSlice<T> for [T] {
        fn par_chunks(&self, chunk_size: usize) -> std::slice::Chunks<'_, T> {
            self.chunks(chunk_size)
        }
    }

    /// rayon's `ParallelSliceMut` and `IntoParallelRefMutIterator` methods the twins use, as
    /// `std` iterators.
    pub(crate) trait ParallelSliceMut<T> {
        fn par_chunks_mut(&mut self, chunk_size: usize) -> std::slice::ChunksMut<'_, T>;
        fn par_iter_mut(&mut self) -> std::slice::IterMut<'_, T>;
    }

    /// rayon's `IndexedParallelIterator::with_min_len` (a task-size hint): nothing to do in order.
    pub(crate) trait WithMinLen: Sized {
        fn with_min_len(self, _min: usize) -> Self {
            self
        }
    }

    impl<I: Iterator> WithMinLen for I {}

    impl<T> ParallelSliceMut<T> for [T] {
        fn par_chunks_mut(&mut self, chunk_size: usize) -> std::slice::ChunksMut<'_, T> {
            self.chunks_mut(chunk_size)
        }
        fn par_iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
            self.iter_mut()
        }
    }
}
