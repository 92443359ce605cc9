//! How the reductions sum each chunk of their terms (`shaders/include/trees.wgsl`): an
//! invocation per chunk summing in order, or a workgroup per chunk meeting in a fixed tree
//! (finished in subgroup shuffles where the adapter has `SUBGROUP`, to the same bits).
//! Batch norm's channel sums, softmax's long rows and the losses' pixel sums each choose
//! per shape class: a tuned family ([`Sums`]) of their class ([`SumsClass`]).

use super::tuning::{self, Tunable, Tuner};
use super::{launch, launch_sized, reduction_chunks};
use crate::error::Result;
use crate::gpu::{Cost, Dispatch, Gpu, Shader, ShaderParams};
use crate::tensor::Binding;
use std::fmt::Debug;
use std::marker::PhantomData;

/// How each chunk of a reduction's terms is summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Summing {
    /// One invocation per chunk, summing in order: what a CPU driver runs best.
    Chunked,
    /// A workgroup of 64 per chunk: strided sums meeting in a fixed tree through workgroup
    /// memory, the variant for GPUs.
    Tree,
    /// The same tree, its levels narrower than a subgroup taken in subgroup shuffles instead
    /// of through workgroup memory and barriers: bit-identical to `Tree`; needs `SUBGROUP`.
    Subgroup,
}

/// Invocations of a tree's workgroup (`trees.wgsl`'s `TREE_SIZE`).
pub(crate) const TREE_WORKGROUP: usize = 64;

impl Summing {
    pub const ALL: [Summing; 3] = [Summing::Chunked, Summing::Tree, Summing::Subgroup];

    /// The variant's name in the tuning cache, `info` and the bench.
    pub fn name(self) -> &'static str {
        match self {
            Summing::Chunked => "chunked",
            Summing::Tree => "tree",
            Summing::Subgroup => "subgroup",
        }
    }

    /// The trees need 64 invocations a workgroup, the subgroup one `SUBGROUP` too.
    pub fn runs_on(self, gpu: &Gpu) -> bool {
        let tree = gpu.workgroup_size() as usize >= TREE_WORKGROUP;
        match self {
            Summing::Chunked => true,
            Summing::Tree => tree,
            Summing::Subgroup => tree && gpu.supports_subgroups(),
        }
    }

    /// Chunks to split each of `outputs` reductions of `terms` terms into: enough sums,
    /// each long enough, to keep the device busy (a tree's 64 invocations count as 64).
    pub(crate) fn chunks(self, outputs: usize, terms: usize) -> usize {
        match self {
            Summing::Chunked => reduction_chunks(outputs, terms),
            Summing::Tree | Summing::Subgroup => {
                reduction_chunks(outputs * TREE_WORKGROUP, terms.div_ceil(TREE_WORKGROUP))
            }
        }
    }

    /// The partial-sums pass over `count` chunks: `trees.wgsl`'s entry point `chunked`, its
    /// `tree` twin (`chunked` + `_tree`) or its `subgroup` one (`chunked` + `_subgroup`, in
    /// the module's subgroup twin) by the variant. Without `SUBGROUP`, or for a module
    /// without a subgroup twin (the f16 softmax), the subgroup variant runs the tree: the
    /// same bits.
    pub(crate) fn launch<P: ShaderParams>(
        self,
        gpu: &Gpu,
        (shader, [chunked, tree, subgroup]): (Shader, [&'static str; 3]),
        params: &P,
        bindings: &[Binding<'_>],
        (count, cost): (usize, Cost),
    ) -> Result<Dispatch> {
        let entry = match (self, shader.with_subgroups()) {
            (Summing::Chunked, _) => return launch(gpu, shader, chunked, params, bindings, count, cost),
            (Summing::Subgroup, Some(twin)) if gpu.supports_subgroups() => (twin, subgroup),
            _ => (shader, tree),
        };
        let size = TREE_WORKGROUP as u32;
        launch_sized(gpu, entry, size, params, bindings, count * TREE_WORKGROUP, cost)
    }
}

/// What a reduction's summing is chosen for, and how a proxy of it is timed.
pub trait SumsClass: Copy + Debug + Eq + Send + 'static {
    /// The family's name in the tuning cache and `hrnet-ocr info`, e.g. `softmax_sums`.
    const FAMILY: &'static str;
    /// The class's key in the cache file.
    fn key(&self) -> String;
    /// Terms the proxy sums: below [`tuning::MIN_TUNED_MACS`] it is not timed.
    fn terms(&self) -> usize;
    /// Milliseconds one run of the class's proxy takes summing by `summing`.
    fn time(&self, gpu: &Gpu, summing: Summing) -> Result<f64>;
}

/// The summing of the reductions of class `C`: one tuned family per kind of class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sums<C>(pub Summing, PhantomData<C>);

impl<C: SumsClass> Tunable for Sums<C> {
    const FAMILY: &'static str = C::FAMILY;
    type Class = C;
    const ALL: &'static [Self] = &[
        Sums(Summing::Chunked, PhantomData),
        Sums(Summing::Tree, PhantomData),
        Sums(Summing::Subgroup, PhantomData),
    ];

    fn name(self) -> &'static str {
        self.0.name()
    }

    fn runs_on(self, gpu: &Gpu) -> bool {
        self.0.runs_on(gpu)
    }

    fn key(class: &C) -> String {
        class.key()
    }

    fn macs(class: &C) -> usize {
        class.terms()
    }

    fn untimed(_: &Gpu, _: &C) -> Self {
        Sums(Summing::Chunked, PhantomData)
    }

    fn time(self, gpu: &Gpu, class: &C) -> Result<f64> {
        class.time(gpu, self.0)
    }
}

/// The summing recording takes for `class`: `tuner`'s choice, or without one the untimed
/// default ([`tuning::choose`]).
pub fn choose<C: SumsClass>(tuner: Option<&Tuner>, gpu: &Gpu, class: &C) -> Summing {
    tuning::choose::<Sums<C>>(tuner, gpu, class).0
}
