//! Per-kernel GPU time from timestamp queries: each dispatch is encoded in a pass of its
//! own whose start and end the device stamps.

use super::read_buffer;
use super::{Dispatch, Gpu};
use crate::error::{Error, Result};

/// wgpu's cap on the queries in one query set.
const MAX_QUERIES: usize = 4096;

/// The device time one dispatch took.
#[derive(Clone, Debug)]
pub struct KernelTiming {
    pub label: &'static str,
    pub nanoseconds: f64,
}

impl Gpu {
    /// Whether [`Gpu::profile`] can time kernels on this device.
    pub fn has_timestamps(&self) -> bool {
        self.features().contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Runs `dispatches` in order, one submission, and returns each one's device time.
    pub fn profile(&self, dispatches: &[&Dispatch]) -> Result<Vec<KernelTiming>> {
        if !self.has_timestamps() {
            return Err(Error::Invalid(format!(
                "adapter {} has no TIMESTAMP_QUERY feature; kernels cannot be timed on the device",
                self.describe()
            )));
        }
        let mut timings = Vec::with_capacity(dispatches.len());
        for chunk in dispatches.chunks(MAX_QUERIES / 2) {
            let count = (2 * chunk.len()) as u32;
            let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kernel timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count,
            });
            let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("resolved timestamps"),
                size: u64::from(count) * 8,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut encoder = self.device.create_command_encoder(&Default::default());
            for (i, d) in chunk.iter().enumerate() {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(d.label()),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &queries,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                d.encode(&mut pass);
            }
            encoder.resolve_query_set(&queries, 0..count, &resolved, 0);
            self.queue.submit([encoder.finish()]);
            let bytes = read_buffer(self, &resolved, 0, u64::from(count) * 8)?;
            let ticks: &[u64] = bytemuck::cast_slice(&bytes);
            let period = f64::from(self.queue.get_timestamp_period());
            timings.extend(chunk.iter().zip(ticks.chunks_exact(2)).map(|(d, t)| KernelTiming {
                label: d.label(),
                nanoseconds: t[1].saturating_sub(t[0]) as f64 * period,
            }));
        }
        Ok(timings)
    }
}
