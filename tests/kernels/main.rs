//! Kernel tests on the device: against PyTorch fixtures and CPU references.

mod batch_norm;
mod common;
mod conv2d;
mod determinism;
mod elementwise;
mod errors;
mod graph;
mod half;
mod heads;
mod infer;
mod limits;
mod loss;
mod matmul;
mod model;
mod ocr;
mod parallel;
mod pool;
mod resize;
mod slabs;
mod softmax;
mod train;
mod training;
mod tuning;
