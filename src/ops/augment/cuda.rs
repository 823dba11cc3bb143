//! Launcher of `kernels/augment.cu` (the twin of [`super::cpu::augment`]).
