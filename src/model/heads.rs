//! The context heads the OCR paper compares (section 4, "complexity"), each built from the
//! executor's nodes, forward and backward: OCR as the official model has it, PSPNet's pyramid
//! pooling, DeepLabv3's ASPP, a self-attention (OCR's object block with every pixel a key),
//! DANet's position and channel attention, and A2-Net's double attention. Each maps a feature
//! map `[N, Cin, H, W]` to a representation `[N, MID, H, W]` that the classifier reads.
//! `tools/reference/context_heads.py` defines the same modules in PyTorch, parameter for
//! parameter, from the papers.

use crate::error::{Error, Result};
use crate::graph::{GraphBuilder, SoftmaxAxis, ValueId};
use crate::kernels::conv2d::Conv2dSpec;

/// Which context module sits between the backbone and the classifier (`MODEL.CONTEXT_HEAD`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ContextHead {
    /// OCR: soft object regions, their representations, pixel-region attention.
    #[default]
    Ocr,
    /// PSPNet's pyramid pooling: bins 1, 2, 3 and 6.
    Ppm,
    /// DeepLabv3's atrous spatial pyramid pooling: rates 12, 24, 36 and image pooling.
    Aspp,
    /// Self-attention: OCR's object block with every pixel a key (an `HW x HW` map).
    SelfAttention,
    /// DANet: position attention plus channel attention.
    Danet,
    /// A2-Net's double attention: gather to global descriptors, distribute back.
    DoubleAttention,
    /// No context: the 3x3 convolution every head starts from, alone.
    None,
}

impl ContextHead {
    /// Every head, in the order the comparison lists them.
    pub const ALL: [ContextHead; 7] = [
        ContextHead::Ppm,
        ContextHead::Aspp,
        ContextHead::Danet,
        ContextHead::SelfAttention,
        ContextHead::DoubleAttention,
        ContextHead::Ocr,
        ContextHead::None,
    ];

    /// The name `MODEL.CONTEXT_HEAD` and the tables use.
    pub fn name(self) -> &'static str {
        match self {
            ContextHead::Ocr => "ocr",
            ContextHead::Ppm => "ppm",
            ContextHead::Aspp => "aspp",
            ContextHead::SelfAttention => "self_attention",
            ContextHead::Danet => "danet",
            ContextHead::DoubleAttention => "double_attention",
            ContextHead::None => "none",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        Self::ALL.into_iter().find(|h| h.name() == lower).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|h| h.name()).collect();
            Error::Invalid(format!("MODEL.CONTEXT_HEAD {s:?}: not one of {}", names.join(", ")))
        })
    }

    /// Whether the head reads the soft object regions (the aux head's logits).
    pub fn reads_regions(self) -> bool {
        self == ContextHead::Ocr
    }
}

/// The sizes a head is built at: its output channels (`MODEL.OCR.MID_CHANNELS`), its key
/// channels (`MODEL.OCR.KEY_CHANNELS`: OCR's and the self-attention's keys, ASPP's branches,
/// the double attention's descriptors), and the resizes' corner convention.
#[derive(Clone, Copy, Debug)]
pub struct HeadDims {
    pub mid: usize,
    pub key: usize,
    pub align_corners: bool,
    /// Whether OCR's 3x3 and aux convolutions have a bias (the official model's do).
    pub ocr_bias: bool,
}

/// PSPNet's pyramid bins.
pub const PPM_BINS: [usize; 4] = [1, 2, 3, 6];
/// DeepLabv3's atrous rates (output stride 8).
pub const ASPP_RATES: [usize; 3] = [12, 24, 36];

const SAME3: Conv2dSpec = Conv2dSpec { stride: [1, 1], padding: [1, 1], dilation: [1, 1] };
const POINT: Conv2dSpec = Conv2dSpec { stride: [1, 1], padding: [0, 0], dilation: [1, 1] };

/// The values a head exposes.
#[derive(Clone, Copy, Debug)]
pub struct HeadValues {
    /// The representation `[N, MID, H, W]` the classifier reads.
    pub out: ValueId,
    /// OCR's soft object regions' logits `[N, K, H, W]` and its gathered region
    /// representations `[N, MID, K, 1]`.
    pub regions: Option<(ValueId, ValueId)>,
}

/// Builds `head` on `feats` `[N, Cin, H, W]`. OCR also reads the soft object regions' logits
/// `[N, K, H, W]`, which `regions` adds to the graph when OCR's 3x3 reduction is in place (the
/// official model's order of nodes).
pub fn build(
    g: &mut GraphBuilder,
    head: ContextHead,
    feats: ValueId,
    regions: impl FnOnce(&mut GraphBuilder) -> Result<ValueId>,
    dims: HeadDims,
) -> Result<HeadValues> {
    let mut h = Head { g, dims };
    let out = |out| HeadValues { out, regions: None };
    Ok(match head {
        ContextHead::Ocr => {
            let f = h.reduce(feats, "conv3x3_ocr")?;
            let logits = regions(h.g)?;
            let (y, context) = h.ocr(f, logits)?;
            HeadValues { out: y, regions: Some((logits, context)) }
        }
        ContextHead::Ppm => out(h.ppm(feats)?),
        ContextHead::Aspp => out(h.aspp(feats)?),
        ContextHead::SelfAttention => out(h.self_attention(feats)?),
        ContextHead::Danet => out(h.danet(feats)?),
        ContextHead::DoubleAttention => out(h.double_attention(feats)?),
        ContextHead::None => out(h.reduce(feats, "conv3x3_ocr")?),
    })
}

struct Head<'a> {
    g: &'a mut GraphBuilder,
    dims: HeadDims,
}

impl Head<'_> {
    fn conv(
        &mut self,
        name: &str,
        x: ValueId,
        k: usize,
        out: usize,
        bias: bool,
        spec: Conv2dSpec,
    ) -> Result<ValueId> {
        self.g.conv2d(name, x, [k, k], out, bias, spec)
    }

    /// conv -> BN -> ReLU, the convolution and the batch norm named `names`; the
    /// convolution `k x k` to `out` channels, with a bias where `bias` says.
    fn unit(
        &mut self,
        x: ValueId,
        names: [String; 2],
        (k, out, bias): (usize, usize, bool),
        spec: Conv2dSpec,
    ) -> Result<ValueId> {
        let y = self.conv(&names[0], x, k, out, bias, spec)?;
        let y = self.g.batch_norm(&names[1], y)?;
        Ok(self.g.relu(y))
    }

    /// conv (no bias) -> BN -> ReLU, named `{p}.conv` and `{p}.bn`.
    fn conv_bn_relu(
        &mut self,
        p: &str,
        x: ValueId,
        k: usize,
        out: usize,
        spec: Conv2dSpec,
    ) -> Result<ValueId> {
        self.unit(x, [format!("{p}.conv"), format!("{p}.bn")], (k, out, false), spec)
    }

    /// The 3x3 conv -> BN -> ReLU to MID channels every attention head starts from, with
    /// OCR's names (`{p}.0`, `{p}.1`) and bias convention.
    fn reduce(&mut self, x: ValueId, p: &str) -> Result<ValueId> {
        let shape = (3, self.dims.mid, self.dims.ocr_bias);
        self.unit(x, [format!("{p}.0"), format!("{p}.1")], shape, SAME3)
    }

    /// OCR's conv1x1 (no bias) -> BN -> ReLU with the official `{p}.{i}` / `{p}.{i+1}.0` names.
    fn ocr_unit(&mut self, x: ValueId, p: &str, i: usize, out: usize) -> Result<ValueId> {
        self.unit(x, [format!("{p}.{i}"), format!("{p}.{}.0", i + 1)], (1, out, false), POINT)
    }

    /// OCR's object block (ObjectAttentionBlock2D + SpatialOCR_Module's fuse) on pixel
    /// representations `f` with keys and values from `context`: `[N, MID, H, W]`.
    fn object_block(&mut self, f: ValueId, context: ValueId, names: [&str; 2]) -> Result<ValueId> {
        let (key, mid) = (self.dims.key, self.dims.mid);
        let [ocb, fuse] = names;
        let q = self.ocr_unit(f, &format!("{ocb}.f_pixel"), 0, key)?;
        let q = self.ocr_unit(q, &format!("{ocb}.f_pixel"), 2, key)?;
        let k = self.ocr_unit(context, &format!("{ocb}.f_object"), 0, key)?;
        let k = self.ocr_unit(k, &format!("{ocb}.f_object"), 2, key)?;
        let v = self.ocr_unit(context, &format!("{ocb}.f_down"), 0, key)?;
        let ctx = self.g.attention(q, k, v, None)?;
        let up = self.ocr_unit(ctx, &format!("{ocb}.f_up"), 0, mid)?;
        let both = self.g.concat(&[up, f], self.dims.align_corners)?;
        self.ocr_unit(both, fuse, 0, mid)
    }

    /// OCR as the official model has it after the 3x3 reduction `f`: soft regions gathered
    /// into region representations, then the object block.
    fn ocr(&mut self, f: ValueId, regions: ValueId) -> Result<(ValueId, ValueId)> {
        let context = self.g.spatial_gather(regions, f)?;
        let names = ["ocr_distri_head.object_context_block", "ocr_distri_head.conv_bn_dropout"];
        Ok((self.object_block(f, context, names)?, context))
    }

    /// Self-attention: the object block with every pixel of `f` a key and a value.
    fn self_attention(&mut self, feats: ValueId) -> Result<ValueId> {
        let f = self.reduce(feats, "self_attention.conv3x3")?;
        self.object_block(f, f, ["self_attention.block", "self_attention.fuse"])
    }

    /// PSPNet's pyramid pooling: per bin, pool -> conv1x1 -> BN -> ReLU, upsampled and
    /// concatenated after the input, then a 3x3 conv -> BN -> ReLU.
    fn ppm(&mut self, feats: ValueId) -> Result<ValueId> {
        let mut parts = vec![feats];
        for (i, bins) in PPM_BINS.into_iter().enumerate() {
            let pooled = self.g.adaptive_avg_pool(feats, [bins, bins])?;
            parts.push(self.conv_bn_relu(&format!("ppm.stages.{i}"), pooled, 1, self.dims.mid, POINT)?);
        }
        let all = self.g.concat(&parts, self.dims.align_corners)?;
        self.conv_bn_relu("ppm.bottleneck", all, 3, self.dims.mid, SAME3)
    }

    /// DeepLabv3's ASPP: a 1x1 branch, three dilated 3x3 branches and image pooling (KEY
    /// channels each), concatenated, then conv1x1 -> BN -> ReLU to MID.
    fn aspp(&mut self, feats: ValueId) -> Result<ValueId> {
        let key = self.dims.key;
        let mut parts = vec![self.conv_bn_relu("aspp.conv_1x1", feats, 1, key, POINT)?];
        for (i, rate) in ASPP_RATES.into_iter().enumerate() {
            let spec = Conv2dSpec { stride: [1, 1], padding: [rate, rate], dilation: [rate, rate] };
            parts.push(self.conv_bn_relu(&format!("aspp.conv_3x3_{}", i + 1), feats, 3, key, spec)?);
        }
        let pooled = self.g.adaptive_avg_pool(feats, [1, 1])?;
        parts.push(self.conv_bn_relu("aspp.image_pool", pooled, 1, key, POINT)?);
        let all = self.g.concat(&parts, self.dims.align_corners)?;
        self.conv_bn_relu("aspp.fuse", all, 1, self.dims.mid, POINT)
    }

    /// DANet: a position-attention branch (queries and keys of MID/8 channels, unscaled
    /// similarities over every pixel) and a channel-attention branch (`softmax(max - X X^T)`,
    /// which is `softmax(-X X^T)`), each from its own 3x3 reduction, added to it through a
    /// learnt scale, and through a 3x3 conv -> BN -> ReLU; the branches summed.
    fn danet(&mut self, feats: ValueId) -> Result<ValueId> {
        let mid = self.dims.mid;
        let p = self.conv_bn_relu("danet.conv5a", feats, 3, mid, SAME3)?;
        let q = self.conv("danet.pam.query_conv", p, 1, mid / 8, true, POINT)?;
        let k = self.conv("danet.pam.key_conv", p, 1, mid / 8, true, POINT)?;
        let v = self.conv("danet.pam.value_conv", p, 1, mid, true, POINT)?;
        let attended = self.g.attention(q, k, v, Some(1.0))?;
        let pam = self.g.scaled_add("danet.pam.gamma", attended, p)?;
        let pam = self.conv_bn_relu("danet.conv51", pam, 3, mid, SAME3)?;

        let c = self.conv_bn_relu("danet.conv5c", feats, 3, mid, SAME3)?;
        let energy = self.g.matmul((c, false), (c, true), [mid, 1])?;
        let attention = self.g.softmax(energy, SoftmaxAxis::Pixels, -1.0)?;
        let size = [self.g.shape(c)[2], self.g.shape(c)[3]];
        let attended = self.g.matmul((attention, false), (c, false), size)?;
        let cam = self.g.scaled_add("danet.cam.gamma", attended, c)?;
        let cam = self.conv_bn_relu("danet.conv52", cam, 3, mid, SAME3)?;
        self.g.add(pam, cam)
    }

    /// A2-Net's double attention on the 3x3 reduction `f`: descriptors `A softmax_pixels(B)^T`
    /// (the spatial gather), distributed by `softmax_channels(V)`, a 1x1 conv back to MID,
    /// added to `f`.
    fn double_attention(&mut self, feats: ValueId) -> Result<ValueId> {
        let (mid, key) = (self.dims.mid, self.dims.key);
        let f = self.reduce(feats, "double_attention.conv3x3")?;
        let a = self.conv("double_attention.convA", f, 1, key, true, POINT)?;
        let b = self.conv("double_attention.convB", f, 1, key, true, POINT)?;
        let v = self.conv("double_attention.convV", f, 1, key, true, POINT)?;
        let descriptors = self.g.spatial_gather(b, a)?;
        let distribution = self.g.softmax(v, SoftmaxAxis::Channels, 1.0)?;
        let size = [self.g.shape(f)[2], self.g.shape(f)[3]];
        let z = self.g.matmul((descriptors, false), (distribution, false), size)?;
        let z = self.conv("double_attention.reconstruct", z, 1, mid, true, POINT)?;
        self.g.add(z, f)
    }
}

/// The sizes of the paper's complexity comparison: its own (a ResNet-101's output stride 8 on a
/// 1024x1024 crop: `[1, 2048, 128, 128]` to 512 channels, KEY 256) and one lavapipe runs in
/// seconds; both with Cityscapes' 19 regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComparisonSize {
    Small,
    Paper,
}

impl ComparisonSize {
    pub fn name(self) -> &'static str {
        match self {
            ComparisonSize::Small => "small",
            ComparisonSize::Paper => "paper",
        }
    }

    /// The input `[1, C, H, W]`, the head's sizes, and the number of regions.
    pub fn dims(self) -> ([usize; 4], HeadDims, usize) {
        let (input, mid, key) = match self {
            ComparisonSize::Small => ([1, 256, 32, 32], 64, 32),
            ComparisonSize::Paper => ([1, 2048, 128, 128], 512, 256),
        };
        (input, HeadDims { mid, key, align_corners: true, ocr_bias: true }, 19)
    }
}

/// `head` alone as the comparison runs it: on an input `x` that needs no gradient (a
/// backbone's output would; the comparison leaves the backbone out) and, for OCR, region
/// logits `regions` that need one (in the model the aux head computes them). Returns the
/// builder and the head's output.
pub fn comparison_graph(head: ContextHead, size: ComparisonSize) -> Result<(GraphBuilder, ValueId)> {
    let ([n, c, h, w], dims, k) = size.dims();
    let mut g = GraphBuilder::new();
    let x = g.input("x", &[n, c, h, w], false);
    let regions = |g: &mut GraphBuilder| Ok(g.input("regions", &[n, k, h, w], true));
    let out = build(&mut g, head, x, regions, dims)?.out;
    Ok((g, out))
}
