//! Spectral label grouping (SPEC section 1): co-occurrence counts, the correlative and
//! discriminative graphs, spectral embedding and k-means.
