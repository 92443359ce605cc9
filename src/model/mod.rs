//! The HRNet-OCR model: configuration, weights and the graph built from them.

pub mod pth;
