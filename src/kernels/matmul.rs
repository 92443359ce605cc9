//! Batched matrix products with either operand transposed, and their backward
//! (`matmul.wgsl`). Every product, transposes included, is one strided kernel. Operands
//! beyond a storage binding run in ranges of the batch ([`slabs::item_ranges`]), each
//! matrix computed as in one launch; a single matrix beyond a binding is refused.

use super::slabs::{self, Items};
use super::tuning::{self, Tunable, Tuner};
use super::{launch, launch_tuned, to_u32};
use crate::error::{Error, Result};
use crate::gpu::{Cost, Dispatch, Gpu, Shader};
use crate::tensor::{Binding, Tensor};

crate::gpu::shader_params! {
    struct Params {
        batch: u32,
        m: u32,
        n: u32,
        k: u32,
        a_batch: u32,
        a_row: u32,
        a_col: u32,
        flags: u32,
        b_batch: u32,
        b_row: u32,
        b_col: u32,
        _pad: u32,
    }
}

const ACCUMULATE: u32 = 1;

/// How a kernel operand reads a stored tensor as a batch of `rows x cols` matrices:
/// element (i, j) of matrix b is at `b * batch + i * row + j * col`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strided {
    pub rows: usize,
    pub cols: usize,
    pub batch: usize,
    pub row: usize,
    pub col: usize,
}

impl Strided {
    /// A row-major `[rows, cols]` matrix per batch entry.
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Strided { rows, cols, batch: rows * cols, row: cols, col: 1 }
    }

    /// The same storage read as the transpose.
    pub fn t(self) -> Self {
        Strided { rows: self.cols, cols: self.rows, batch: self.batch, row: self.col, col: self.row }
    }

    /// The largest element index read across `batches` matrices, plus one.
    fn extent(&self, batches: usize) -> usize {
        (batches - 1) * self.batch + (self.rows - 1) * self.row + (self.cols - 1) * self.col + 1
    }
}

/// Which kernel computes a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// A 16 x 16 tile of c in each invocation's registers: the fast one at real sizes.
    Tiles16,
    /// One element of c per invocation: slow per element, but compiled in tens of
    /// milliseconds where the tiles take 1.5 s on lavapipe.
    PerElement,
    /// 32 x 32 elements of c per workgroup of 64, k staged through workgroup memory in
    /// slices of 8 rows (the shader's `SLICE` override): the variant for GPUs.
    TiledK8,
    /// The same with slices of 16: half the barriers, twice the workgroup memory.
    TiledK16,
}

/// Products below this many multiply-adds take [`MatmulKernel::PerElement`] untimed: about a
/// millisecond either way on lavapipe, so a first run (the OCR head at small inputs) skips
/// compiling the tiles.
pub const SMALL_PRODUCT_MACS: usize = 1 << 20;

impl MatmulKernel {
    /// The shader entry point that computes it.
    pub fn entry(self) -> &'static str {
        match self {
            MatmulKernel::Tiles16 => "matmul",
            MatmulKernel::PerElement => "matmul_per_element",
            MatmulKernel::TiledK8 | MatmulKernel::TiledK16 => "matmul_tiled",
        }
    }
}

/// A product's shape class: its sizes (the batch folded into the rows), rounded up to
/// powers of two and capped so that a proxy stays cheap, and which operands are read
/// transposed (the strides decide the memory access pattern).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulClass {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    pub a_transposed: bool,
    pub b_transposed: bool,
}

/// A proxy's largest size along any axis.
const PROXY_LEN: usize = 4096;

impl MatmulClass {
    /// The class of `batch` products of the views `a` and `b`.
    pub fn of(batch: usize, a: &Strided, b: &Strided) -> Self {
        let round = |len: usize| len.next_power_of_two().min(PROXY_LEN);
        MatmulClass {
            rows: round(batch * a.rows),
            k: round(a.cols),
            n: round(b.cols),
            a_transposed: a.col != 1,
            b_transposed: b.col != 1,
        }
    }

    /// The operand views of the class's proxy (one matrix).
    fn views(&self) -> (Strided, Strided) {
        let view = |rows, cols, transposed| {
            if transposed {
                Strided::row_major(cols, rows).t()
            } else {
                Strided::row_major(rows, cols)
            }
        };
        (view(self.rows, self.k, self.a_transposed), view(self.k, self.n, self.b_transposed))
    }
}

impl Tunable for MatmulKernel {
    const FAMILY: &'static str = "matmul";
    type Class = MatmulClass;
    const ALL: &'static [Self] =
        &[MatmulKernel::Tiles16, MatmulKernel::PerElement, MatmulKernel::TiledK8, MatmulKernel::TiledK16];

    fn name(self) -> &'static str {
        match self {
            MatmulKernel::Tiles16 => "tiles16",
            MatmulKernel::PerElement => "per-element",
            MatmulKernel::TiledK8 => "tiled-k8",
            MatmulKernel::TiledK16 => "tiled-k16",
        }
    }

    fn slice(self) -> Option<u32> {
        match self {
            MatmulKernel::Tiles16 | MatmulKernel::PerElement => None,
            MatmulKernel::TiledK8 => Some(8),
            MatmulKernel::TiledK16 => Some(16),
        }
    }

    fn key(c: &MatmulClass) -> String {
        let t = |transposed| if transposed { "T" } else { "N" };
        format!("{}x{}x{} {}{}", c.rows, c.k, c.n, t(c.a_transposed), t(c.b_transposed))
    }

    fn macs(c: &MatmulClass) -> usize {
        c.rows * c.k * c.n
    }

    /// The tiles, but per element below [`SMALL_PRODUCT_MACS`].
    fn untimed(_: &Gpu, c: &MatmulClass) -> Self {
        if Self::macs(c) < SMALL_PRODUCT_MACS {
            MatmulKernel::PerElement
        } else {
            MatmulKernel::Tiles16
        }
    }

    fn time(self, gpu: &Gpu, c: &MatmulClass) -> Result<f64> {
        let (av, bv) = c.views();
        let a = Tensor::zeros(gpu, &[c.rows * c.k])?;
        let b = Tensor::zeros(gpu, &[c.k * c.n])?;
        let out = Tensor::zeros(gpu, &[c.rows * c.n])?;
        tuning::time_dispatches(gpu, &product_with(gpu, self, 1, (&a, av), (&b, bv), &out, false)?)
    }
}

/// `c[b] (+)= a[b] @ b[b]` for the strided views `a` (m x k) and `b` (k x n); `c` is
/// row-major `[batch, m, n]` (any shape with that many elements). The kernel is `tuner`'s
/// choice for the product's class, or the untimed default ([`tuning::choose`]).
pub fn product(
    gpu: &Gpu,
    tuner: Option<&Tuner>,
    batch: usize,
    a: (&Tensor, Strided),
    b: (&Tensor, Strided),
    c: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let kernel = tuning::choose(tuner, gpu, &MatmulClass::of(batch, &a.1, &b.1));
    product_with(gpu, kernel, batch, a, b, c, accumulate)
}

/// [`product`] computed by `kernel`, whatever the size (for tests and benchmarks).
pub fn product_with(
    gpu: &Gpu,
    kernel: MatmulKernel,
    batch: usize,
    (a, av): (&Tensor, Strided),
    (b, bv): (&Tensor, Strided),
    c: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let (m, k, n) = (av.rows, av.cols, bv.cols);
    if bv.rows != k {
        return Err(Error::Invalid(format!("matmul: a is {m}x{k} but b is {}x{n}", bv.rows)));
    }
    if batch == 0 || m == 0 || n == 0 || k == 0 {
        return Err(Error::Invalid(format!("matmul: empty product {batch} x ({m}x{k}) @ ({k}x{n})")));
    }
    for (name, t, view) in [("a", a, av), ("b", b, bv)] {
        if view.extent(batch) > t.numel() {
            return Err(Error::Invalid(format!(
                "matmul operand {name} of shape {:?} is too small for {batch} matrices of {}x{}",
                t.shape(),
                view.rows,
                view.cols
            )));
        }
    }
    if c.numel() != batch * m * n {
        return Err(Error::Shape {
            what: "matmul output".into(),
            expected: format!("{batch} x {m} x {n} elements"),
            actual: format!("{:?}", c.shape()),
        });
    }
    let items = [
        Items { tensor: a, stride: av.batch, extent: av.extent(1) },
        Items { tensor: b, stride: bv.batch, extent: bv.extent(1) },
        Items { tensor: c, stride: m * n, extent: m * n },
    ];
    if let Some(ranges) = slabs::item_ranges(gpu, batch, &items)? {
        let mut d = Vec::new();
        for range in ranges {
            let [va, vb, vc] = [0, 1, 2].map(|i| items[i].view(gpu, &range));
            d.extend(product_with(gpu, kernel, range.len(), (&va?, av), (&vb?, bv), &vc?, accumulate)?);
        }
        return Ok(d);
    }
    let u = to_u32;
    let p = Params {
        batch: u("batch", batch)?,
        m: u("m", m)?,
        n: u("n", n)?,
        k: u("k", k)?,
        a_batch: u("a batch stride", av.batch)?,
        a_row: u("a row stride", av.row)?,
        a_col: u("a column stride", av.col)?,
        flags: if accumulate { ACCUMULATE } else { 0 },
        b_batch: u("b batch stride", bv.batch)?,
        b_row: u("b row stride", bv.row)?,
        b_col: u("b column stride", bv.col)?,
        _pad: 0,
    };
    u("a extent", av.extent(batch))?;
    u("b extent", bv.extent(batch))?;
    let cost = Cost {
        flops: 2 * (batch * m * n * k) as u64,
        bytes: (batch * (m * k + k * n + m * n * (1 + usize::from(accumulate)))) as u64 * c.dtype().size(),
    };
    let bindings = [Binding::read(1, a), Binding::read(2, b), Binding::write(3, c)];
    let entry = (Shader::Matmul.storing(c.dtype())?, kernel.entry());
    Ok(vec![match kernel.slice() {
        // A workgroup per (matrix, 16 rows, block of WG 16-column tiles). One workgroup size
        // for every shape (each size is another pipeline for the driver to compile); on
        // narrow products the invocations past the last tile return at once.
        None => {
            let wg = gpu.workgroup_size() as usize;
            let invocations = match kernel {
                MatmulKernel::PerElement => batch * m * n,
                _ => batch * m.div_ceil(16) * n.div_ceil(16 * wg) * wg,
            };
            launch(gpu, entry.0, entry.1, &p, &bindings, invocations, cost)?
        }
        // A workgroup of 64 per (matrix, 32 rows, 32 columns).
        Some(slice) => {
            let invocations = batch * m.div_ceil(32) * n.div_ceil(32) * 64;
            launch_tuned(gpu, entry, 64, &[("SLICE", f64::from(slice))], &p, &bindings, invocations, cost)?
        }
    }])
}

/// A batched product of row-major tensors: `a` is `[batch, m, k]` (`[batch, k, m]` if
/// `trans_a`), `b` is `[batch, k, n]` (`[batch, n, k]` if `trans_b`), `c` is `[batch, m, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matmul {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl Matmul {
    fn a(&self) -> Strided {
        if self.trans_a {
            Strided::row_major(self.k, self.m).t()
        } else {
            Strided::row_major(self.m, self.k)
        }
    }

    fn b(&self) -> Strided {
        if self.trans_b {
            Strided::row_major(self.n, self.k).t()
        } else {
            Strided::row_major(self.k, self.n)
        }
    }

    fn c(&self) -> Strided {
        Strided::row_major(self.m, self.n)
    }

    /// `c = op(a) @ op(b)`, each product by `tuner`'s choice ([`product`]).
    pub fn forward(
        &self,
        gpu: &Gpu,
        tuner: Option<&Tuner>,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
    ) -> Result<Vec<Dispatch>> {
        product(gpu, tuner, self.batch, (a, self.a()), (b, self.b()), c, false)
    }

    /// `grad_a (+)= grad_c @ op(b)^T`, written in a's stored layout: when a is stored
    /// transposed, the product is formed transposed instead (`op(b) @ grad_c^T`).
    pub fn backward_a(
        &self,
        gpu: &Gpu,
        tuner: Option<&Tuner>,
        grad_c: &Tensor,
        b: &Tensor,
        grad_a: &Tensor,
        accumulate: bool,
    ) -> Result<Vec<Dispatch>> {
        if self.trans_a {
            product(gpu, tuner, self.batch, (b, self.b()), (grad_c, self.c().t()), grad_a, accumulate)
        } else {
            product(gpu, tuner, self.batch, (grad_c, self.c()), (b, self.b().t()), grad_a, accumulate)
        }
    }

    /// `grad_b (+)= op(a)^T @ grad_c`, in b's stored layout (`grad_c^T @ op(a)` when b is
    /// stored transposed).
    pub fn backward_b(
        &self,
        gpu: &Gpu,
        tuner: Option<&Tuner>,
        a: &Tensor,
        grad_c: &Tensor,
        grad_b: &Tensor,
        accumulate: bool,
    ) -> Result<Vec<Dispatch>> {
        if self.trans_b {
            product(gpu, tuner, self.batch, (grad_c, self.c().t()), (a, self.a()), grad_b, accumulate)
        } else {
            product(gpu, tuner, self.batch, (a, self.a().t()), (grad_c, self.c()), grad_b, accumulate)
        }
    }
}
