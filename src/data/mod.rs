//! Datasets.

pub mod procedural;
