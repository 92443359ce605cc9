//! Every kernel alone, forward and each backward, at HRNet's shapes (the cases of
//! `hrnet_ocr::bench::hrnet_suite`: W18 and W48 branch widths for a 256 x 512 input, the
//! fuse-layer and OCR-head convolutions, the OCR head, losses, metrics and SGD).
//! Throughput is FLOP/s (2 x multiply-adds) for compute-bound kernels and bytes/s (minimum
//! traffic) for memory-bound ones. Each group name carries the adapter's name, so results
//! from different GPUs and backends sit side by side.
//!
//! `cargo bench --bench kernels -- conv2d_forward` runs one group; `hrnet-ocr bench
//! --kernels` runs the same cases with a roofline and JSON output.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hrnet_ocr::bench::hrnet_suite;
use hrnet_ocr::Gpu;
use std::time::Duration;

fn kernels(c: &mut Criterion) {
    let gpu = Gpu::new().expect("a GPU adapter");
    for case in hrnet_suite(&gpu, "").expect("record the kernel cases") {
        let cost = case.cost();
        let mut g = c.benchmark_group(format!("{}_{} [{}]", case.kernel, case.pass, gpu.info().name));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        g.throughput(if case.memory_bound {
            Throughput::Bytes(cost.bytes)
        } else {
            Throughput::Elements(cost.flops)
        });
        g.bench_function(BenchmarkId::from_parameter(&case.case), |b| {
            b.iter(|| gpu.run(&case.dispatches).expect("run"))
        });
        g.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
