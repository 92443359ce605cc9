//! Launches over tensors larger than one storage binding (`max_storage_buffer_binding_size`,
//! 128 MiB on lavapipe and in browsers). A tensor may be as large as a buffer; a kernel binds
//! only what fits: a launcher whose tensors exceed the binding records one dispatch per
//! slab, each binding views of one item's channel range (contiguous in NCHW), in order.
//! Kernels whose outputs are independent per channel give bit-identical results this way;
//! those that sum over channels accumulate over the slabs in order (said where they do).

use crate::error::{fmt_shape, Error, Result};
use crate::gpu::Gpu;
use crate::tensor::Tensor;
use std::ops::Range;

/// How one tensor `[N, C, ...]` of a split launch is cut along the launch's shared
/// channel axis.
#[derive(Clone, Copy)]
pub(crate) struct Cut<'a> {
    pub tensor: &'a Tensor,
    /// The tensor's channel where the shared axis starts (a concat's slice).
    pub first: usize,
}

impl<'a> Cut<'a> {
    /// `tensor`'s channels `first..` as the shared axis.
    pub fn new(tensor: &'a Tensor, first: usize) -> Self {
        Cut { tensor, first }
    }

    /// Elements per channel.
    fn plane(&self) -> usize {
        self.tensor.shape()[2..].iter().product()
    }

    fn plane_bytes(&self) -> u64 {
        self.plane() as u64 * self.tensor.dtype().size()
    }

    /// The element where channel `c` of the shared axis starts, at item `item`.
    fn start(&self, item: usize, c: usize) -> usize {
        (item * self.tensor.shape()[1] + self.first + c) * self.plane()
    }

    /// The view `[1, len, ...]` of channels `channels` (of the shared axis) at `item`.
    pub fn view(&self, gpu: &Gpu, item: usize, channels: &Range<usize>) -> Result<Tensor> {
        let mut view = vec![1, channels.len()];
        view.extend_from_slice(&self.tensor.shape()[2..]);
        self.tensor.view(gpu, self.start(item, channels.start), &view)
    }
}

/// One piece of a split launch: channels `channels` of item `item`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Slab {
    pub item: usize,
    pub channels: Range<usize>,
}

impl Slab {
    /// The view of `cut` this slab binds.
    pub fn view(&self, gpu: &Gpu, cut: Cut<'_>) -> Result<Tensor> {
        cut.view(gpu, self.item, &self.channels)
    }
}

/// Whether any of `tensors` is larger than a storage binding.
pub(crate) fn exceeds_binding(gpu: &Gpu, tensors: &[&Tensor]) -> bool {
    let limit = gpu.limits().max_storage_buffer_binding_size;
    tensors.iter().any(|t| t.bytes() > limit)
}

/// The slabs of `channels` channels shared by `cuts`, for `items` items: per item, the
/// widest channel ranges whose views all fit a binding and start where the adapter's
/// storage offset alignment allows. An error names the tensor when even one channel's
/// view is too large, or when no aligned cut exists.
pub(crate) fn channel_slabs(gpu: &Gpu, items: usize, channels: usize, cuts: &[Cut<'_>]) -> Result<Vec<Slab>> {
    let limits = gpu.limits();
    let limit = limits.max_storage_buffer_binding_size;
    let align = u64::from(limits.min_storage_buffer_offset_alignment);
    let widest = cuts.iter().map(|c| (limit / c.plane_bytes().max(1)) as usize).min().unwrap_or(channels);
    if widest == 0 {
        let c = cuts.iter().max_by_key(|c| c.plane()).expect("a cut is too large");
        return Err(Error::Limit {
            what: format!("one channel of a tensor of shape {}", fmt_shape(c.tensor.shape())),
            bytes: c.plane_bytes(),
            limit,
            limit_name: "max_storage_buffer_binding_size",
        });
    }
    let aligned = |item: usize, c: usize| {
        cuts.iter().all(|cut| {
            (cut.tensor.offset() + cut.tensor.dtype().size() * cut.start(item, c) as u64) % align == 0
        })
    };
    let mut slabs = Vec::new();
    for item in 0..items {
        let ranges = aligned_ranges(channels, widest, |c| aligned(item, c))
            .ok_or_else(|| unaligned(cuts.iter().map(|c| c.tensor), limit, align, "into channel slabs"))?;
        slabs.extend(ranges.into_iter().map(|channels| Slab { item, channels }));
    }
    Ok(slabs)
}

/// Consecutive ranges covering `0..len`, each at most `longest` long, every range
/// starting where `aligned` allows; `None` when no such cut exists.
fn aligned_ranges(len: usize, longest: usize, aligned: impl Fn(usize) -> bool) -> Option<Vec<Range<usize>>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < len {
        let mut end = (start + longest).min(len);
        while end < len && end > start && !aligned(end) {
            end -= 1;
        }
        if end == start || !aligned(start) {
            return None;
        }
        ranges.push(start..end);
        start = end;
    }
    Some(ranges)
}

/// The error for tensors beyond a binding that no cut at the offset alignment splits.
fn unaligned<'a>(tensors: impl Iterator<Item = &'a Tensor>, limit: u64, align: u64, how: &str) -> Error {
    let shapes: Vec<String> = tensors.map(|t| fmt_shape(t.shape())).collect();
    Error::Invalid(format!(
        "tensors of shapes {} exceed a storage binding ({limit} bytes) and cannot be cut {how} at the \
         adapter's {align}-byte offset alignment",
        shapes.join(", ")
    ))
}

/// [`channel_slabs`] when one of the cut tensors exceeds a binding, or `None` when every one
/// fits and the launch runs whole.
pub(crate) fn split(gpu: &Gpu, items: usize, channels: usize, cuts: &[Cut<'_>]) -> Result<Option<Vec<Slab>>> {
    let tensors: Vec<&Tensor> = cuts.iter().map(|c| c.tensor).collect();
    if !exceeds_binding(gpu, &tensors) {
        return Ok(None);
    }
    channel_slabs(gpu, items, channels, cuts).map(Some)
}

/// Flat ranges of `len` elements, each fitting a binding and a multiple of the offset
/// alignment long, for elementwise launches over tensors of equal shape.
pub(crate) fn flat_chunks(gpu: &Gpu, len: usize, element_bytes: u64) -> Vec<Range<usize>> {
    let limits = gpu.limits();
    let align = (u64::from(limits.min_storage_buffer_offset_alignment) / element_bytes).max(1) as usize;
    let chunk =
        ((limits.max_storage_buffer_binding_size / element_bytes) as usize / align * align).max(align);
    (0..len).step_by(chunk).map(|s| s..(s + chunk).min(len)).collect()
}

/// One tensor of a launch split into ranges of items: item `i` starts at element
/// `i * stride` (0: every item reads the same elements) and spans `extent` elements.
#[derive(Clone, Copy)]
pub(crate) struct Items<'a> {
    pub tensor: &'a Tensor,
    pub stride: usize,
    pub extent: usize,
}

impl Items<'_> {
    /// Elements spanned by `count` items from the first.
    fn span(&self, count: usize) -> usize {
        (count - 1) * self.stride + self.extent
    }

    /// The view of items `range`, flat.
    pub fn view(&self, gpu: &Gpu, range: &Range<usize>) -> Result<Tensor> {
        self.tensor.view(gpu, range.start * self.stride, &[self.span(range.len())])
    }
}

/// Ranges of `items` consecutive items, each the longest whose views of `tensors` fit a
/// binding and start where the adapter's offset alignment allows (the launch of
/// independent items, a softmax row or a product's matrix, split bit-identically), or
/// `None` when every tensor fits whole. An error names the tensor when one item is too
/// large, or when no aligned cut exists.
pub(crate) fn item_ranges(
    gpu: &Gpu,
    items: usize,
    tensors: &[Items<'_>],
) -> Result<Option<Vec<Range<usize>>>> {
    let all: Vec<&Tensor> = tensors.iter().map(|t| t.tensor).collect();
    if !exceeds_binding(gpu, &all) {
        return Ok(None);
    }
    let limits = gpu.limits();
    let (limit, align) =
        (limits.max_storage_buffer_binding_size, u64::from(limits.min_storage_buffer_offset_alignment));
    let mut longest = items;
    for t in tensors {
        let elements = (limit / t.tensor.dtype().size()) as usize;
        if t.extent > elements {
            return Err(Error::Limit {
                what: format!(
                    "one item ({} elements) of a tensor of shape {}",
                    t.extent,
                    fmt_shape(t.tensor.shape())
                ),
                bytes: t.tensor.dtype().size() * t.extent as u64,
                limit,
                limit_name: "max_storage_buffer_binding_size",
            });
        }
        if let Some(more) = (elements - t.extent).checked_div(t.stride) {
            longest = longest.min(more + 1);
        }
    }
    let aligned = |i: usize| {
        tensors
            .iter()
            .all(|t| (t.tensor.offset() + t.tensor.dtype().size() * (i * t.stride) as u64) % align == 0)
    };
    aligned_ranges(items, longest, aligned)
        .map(Some)
        .ok_or_else(|| unaligned(all.into_iter(), limit, align, "between items"))
}
