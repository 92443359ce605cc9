//! The HRNet-OCR model: configuration, weights and the graph built from them.

pub mod config;
pub mod heads;
pub mod hrnet;
pub mod mmseg;

pub mod weights;
pub mod yaml;

pub use config::Config;
