//! HRNet-OCR (spec sections 2 and 3) built on the executor, with the official state-dict
//! names as parameter names.

use super::config::{Block, Config, Convention};
use super::heads::{self, HeadDims};
use crate::error::Result;
use crate::graph::{GraphBuilder, LossSpec, ValueId};
use crate::kernels::conv2d::Conv2dSpec;
use crate::kernels::loss::{Ohem, Reduction};

/// The model's dropout before cls_head (hard-coded in the official model).
pub const OCR_DROPOUT: f32 = 0.05;

/// The values a built model exposes.
#[derive(Clone, Copy, Debug)]
pub struct ModelValues {
    /// Soft object regions `[N, K, H/4, W/4]`.
    pub aux: ValueId,
    /// The main logits `[N, K, H/4, W/4]`.
    pub out: ValueId,
    /// The backbone's concat `[N, Ccat, H/4, W/4]`.
    pub feats: ValueId,
    /// OCR's gathered region representations `[N, MID, K, 1]` (other heads have none).
    pub context: Option<ValueId>,
    /// The context head's output, before cls_head `[N, MID, H/4, W/4]`.
    pub ocr_feats: ValueId,
}

const SAME3: Conv2dSpec = Conv2dSpec { stride: [1, 1], padding: [1, 1], dilation: [1, 1] };
const DOWN3: Conv2dSpec = Conv2dSpec { stride: [2, 2], padding: [1, 1], dilation: [1, 1] };
const POINT: Conv2dSpec = Conv2dSpec { stride: [1, 1], padding: [0, 0], dilation: [1, 1] };

struct Builder<'a> {
    g: &'a mut GraphBuilder,
    cfg: &'a Config,
}

impl Builder<'_> {
    fn channels(&self, x: ValueId) -> usize {
        self.g.shape(x)[1]
    }

    /// conv (no bias) -> BN [-> ReLU], named `{conv}` and `{bn}`.
    fn conv_bn(
        &mut self,
        x: ValueId,
        (conv, bn): (&str, &str),
        k: usize,
        out: usize,
        spec: Conv2dSpec,
        relu: bool,
    ) -> Result<ValueId> {
        let y = self.g.conv2d(conv, x, [k, k], out, false, spec)?;
        let y = self.g.batch_norm(bn, y)?;
        Ok(if relu { self.g.relu(y) } else { y })
    }

    /// A residual block (BasicBlock or Bottleneck) named `{p}.conv1` etc.
    fn block(&mut self, p: &str, x: ValueId, block: Block, planes: usize) -> Result<ValueId> {
        let c = |n: &str| format!("{p}.{n}");
        let inplanes = self.channels(x);
        let out_planes = planes * block.expansion();
        let y = match block {
            Block::Basic => {
                let y = self.conv_bn(x, (&c("conv1"), &c("bn1")), 3, planes, SAME3, true)?;
                self.conv_bn(y, (&c("conv2"), &c("bn2")), 3, planes, SAME3, false)?
            }
            Block::Bottleneck => {
                let y = self.conv_bn(x, (&c("conv1"), &c("bn1")), 1, planes, POINT, true)?;
                let y = self.conv_bn(y, (&c("conv2"), &c("bn2")), 3, planes, SAME3, true)?;
                self.conv_bn(y, (&c("conv3"), &c("bn3")), 1, out_planes, POINT, false)?
            }
        };
        let residual = if inplanes == out_planes {
            x
        } else {
            self.conv_bn(x, (&c("downsample.0"), &c("downsample.1")), 1, out_planes, POINT, false)?
        };
        self.g.add_relu(y, residual)
    }

    /// The transition from one stage's branches to the next stage's (spec 2.3).
    fn transition(&mut self, t: usize, xs: &[ValueId], cur: &[usize]) -> Result<Vec<ValueId>> {
        let mut out = Vec::with_capacity(cur.len());
        for (i, &c) in cur.iter().enumerate() {
            if i < xs.len() {
                if self.channels(xs[i]) == c {
                    out.push(xs[i]);
                } else {
                    let p = format!("transition{t}.{i}");
                    out.push(self.conv_bn(
                        xs[i],
                        (&format!("{p}.0"), &format!("{p}.1")),
                        3,
                        c,
                        SAME3,
                        true,
                    )?);
                }
                continue;
            }
            // A new branch: stride-2 units from the lowest-resolution branch, all with ReLU.
            let mut y = *xs.last().expect("a stage has branches");
            let units = i + 1 - xs.len();
            for u in 0..units {
                let width = if u + 1 == units { c } else { self.channels(y) };
                let p = format!("transition{t}.{i}.{u}");
                y = self.conv_bn(y, (&format!("{p}.0"), &format!("{p}.1")), 3, width, DOWN3, true)?;
            }
            out.push(y);
        }
        Ok(out)
    }

    /// One HighResolutionModule: branches of blocks, then the fuse layers (spec 2.4).
    fn module(&mut self, p: &str, xs: &[ValueId], s: usize) -> Result<Vec<ValueId>> {
        let stage = &self.cfg.stages[s];
        let (block, channels, blocks) = (stage.block, stage.channels.clone(), stage.blocks.clone());
        let mut ys = Vec::with_capacity(xs.len());
        for (b, &x) in xs.iter().enumerate() {
            let mut y = x;
            for k in 0..blocks[b] {
                y = self.block(&format!("{p}.branches.{b}.{k}"), y, block, channels[b])?;
            }
            ys.push(y);
        }
        if ys.len() == 1 {
            return Ok(ys);
        }
        let mut fused = Vec::with_capacity(ys.len());
        for i in 0..ys.len() {
            let size = [self.g.shape(ys[i])[2], self.g.shape(ys[i])[3]];
            let ci = self.channels(ys[i]);
            let mut sum: Option<ValueId> = None;
            for (j, &yj) in ys.iter().enumerate() {
                let q = |t: String| format!("{p}.fuse_layers.{i}.{j}{t}");
                let term = if j == i {
                    yj
                } else if j > i {
                    let y = self.conv_bn(yj, (&q(".0".into()), &q(".1".into())), 1, ci, POINT, false)?;
                    self.upsample(y, j - i, size)?
                } else {
                    let mut y = yj;
                    for t in 0..i - j {
                        let last = t + 1 == i - j;
                        let width = if last { ci } else { self.channels(yj) };
                        let names = (q(format!(".{t}.0")), q(format!(".{t}.1")));
                        y = self.conv_bn(y, (&names.0, &names.1), 3, width, DOWN3, !last)?;
                    }
                    y
                };
                let last = j + 1 == ys.len();
                sum = Some(match sum {
                    None => term,
                    Some(acc) if last => self.g.add_relu(acc, term)?,
                    Some(acc) => self.g.add(acc, term)?,
                });
            }
            fused.push(sum.expect("at least two branches"));
        }
        Ok(fused)
    }

    /// A fuse layer's upsampling of a branch `levels` below to `size`. mmsegmentation's
    /// `Upsample` scales by `2^levels` first and its fuse then resizes to `size`, which differs
    /// from one resize where a stride-2 convolution rounded an odd size up.
    fn upsample(&mut self, y: ValueId, levels: usize, size: [usize; 2]) -> Result<ValueId> {
        if self.cfg.convention == Convention::Mmsegmentation {
            let scaled = [self.g.shape(y)[2] << levels, self.g.shape(y)[3] << levels];
            if scaled != size {
                let y = self.g.resize(y, scaled, false)?;
                return self.g.resize(y, size, false);
            }
        }
        self.g.resize(y, size, self.cfg.align_corners)
    }

    fn backbone(&mut self, input: ValueId) -> Result<ValueId> {
        let x = self.conv_bn(input, ("conv1", "bn1"), 3, 64, DOWN3, true)?;
        let mut x = self.conv_bn(x, ("conv2", "bn2"), 3, 64, DOWN3, true)?;
        let s1 = self.cfg.stages[0].clone();
        for k in 0..s1.blocks[0] {
            x = self.block(&format!("layer1.{k}"), x, s1.block, s1.channels[0])?;
        }
        let mut xs = vec![x];
        for s in 1..4 {
            let cur = self.cfg.stages[s].out_channels();
            xs = self.transition(s, &xs, &cur)?;
            for m in 0..self.cfg.stages[s].modules {
                xs = self.module(&format!("stage{}.{m}", s + 1), &xs, s)?;
            }
        }
        self.g.concat(&xs, self.cfg.align_corners)
    }

    /// The head: the aux head's soft object regions (supervised by the aux loss whatever the
    /// head), the context head (`MODEL.CONTEXT_HEAD`), dropout, the classifier.
    fn head(&mut self, feats: ValueId, dropout: f32) -> Result<ModelValues> {
        let (k, ccat) = (self.cfg.num_classes, self.channels(feats));
        let bias = self.cfg.head_conv_bias();
        let aux_head = |g: &mut GraphBuilder| -> Result<ValueId> {
            let a = g.conv2d("aux_head.0", feats, [1, 1], ccat, bias, POINT)?;
            let a = g.batch_norm("aux_head.1", a)?;
            let a = g.relu(a);
            g.conv2d("aux_head.3", a, [1, 1], k, true, POINT)
        };
        let dims = HeadDims {
            mid: self.cfg.mid_channels,
            key: self.cfg.key_channels,
            align_corners: self.cfg.align_corners,
            ocr_bias: bias,
        };
        let head = self.cfg.context_head;
        let (y, aux, context) = if head.reads_regions() {
            let h = heads::build(self.g, head, feats, aux_head, dims)?;
            let (aux, context) = h.regions.expect("a head that reads regions exposes them");
            (h.out, aux, Some(context))
        } else {
            let h = heads::build(self.g, head, feats, aux_head, dims)?;
            (h.out, aux_head(self.g)?, None)
        };
        let ocr_feats = self.g.dropout2d(y, dropout);
        let out = self.g.conv2d("cls_head", ocr_feats, [1, 1], k, true, POINT)?;
        Ok(ModelValues { aux, out, feats, context, ocr_feats })
    }
}

/// The official training loss on the model's outputs `[aux, out]`: `BALANCE_WEIGHTS[0] * L(aux) +
/// BALANCE_WEIGHTS[1] * L(out)` with the config's ignore label and class weights, each
/// output resized to the labels first. L is PyTorch's weighted-mean cross entropy
/// (`CrossEntropy`); with `LOSS.USE_OHEM` it is the official `OhemCrossEntropy`'s: OHEM on
/// the main output only, the aux output's unreduced cross entropy averaged by the train
/// loop over every pixel ([`Reduction::AllPixels`]).
pub fn add_losses(
    g: &mut GraphBuilder,
    cfg: &Config,
    [aux_out, out]: [ValueId; 2],
    labels: ValueId,
) -> Result<()> {
    let class_weight = cfg.class_weights.as_deref().map(|w| g.constant("class_weight", w));
    let (aux, main) = match cfg.ohem {
        Some(o) => (Reduction::AllPixels, Reduction::Ohem(Ohem { thresh: o.thresh, min_kept: o.min_kept })),
        None => (Reduction::Mean, Reduction::Mean),
    };
    let terms = [("aux", aux_out, cfg.balance_weights[0], aux), ("main", out, cfg.balance_weights[1], main)];
    for (name, logits, weight, reduction) in terms {
        let spec = LossSpec {
            name,
            weight,
            ignore_label: cfg.ignore_index(),
            reduction,
            align_corners: cfg.align_corners,
            class_weight,
        };
        g.cross_entropy(spec, logits, labels)?;
    }
    Ok(())
}

/// Adds HRNet-OCR to `g` reading `input` `[N, 3, H, W]`; `dropout` is the training dropout
/// before cls_head ([`Config::head_dropout`], 0 to leave it out).
pub fn build(g: &mut GraphBuilder, cfg: &Config, input: ValueId, dropout: f32) -> Result<ModelValues> {
    let mut b = Builder { g, cfg };
    let feats = b.backbone(input)?;
    b.head(feats, dropout)
}
