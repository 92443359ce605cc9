//! Readers of outside formats that need more than a crate: PyTorch checkpoints.

pub mod pth;
