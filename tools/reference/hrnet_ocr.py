#!/usr/bin/env python3
"""PyTorch reference implementation of HRNet-OCR (HRNetV2 backbone + OCR head).

Written from `docs/spec.md` (sections 1-4 and 7). It rebuilds the
official segmentation model so that:

* the module attribute names give exactly the official state-dict keys
  (spec 7.3, without the `model.` prefix of the training wrapper), so an
  official checkpoint loads with `load_state_dict` after stripping `model.`;
* `forward(x)` returns `[aux_logits, main_logits]`, both at 1/4 of the input
  resolution (no upsampling inside the model);
* `forward_with_intermediates(x)` also returns the backbone concat (`feats`),
  the gathered object-region representations (`context`, N x MID x K x 1) and
  the output of the OCR distribution head (`ocr_feats`, after
  conv_bn_dropout, i.e. the input of `cls_head`).

`hrnet_ocr_loss(aux, out, label, cfg)` is the training loss (spec section 4,
plain cross entropy; OHEM is not implemented here).

The model is configured by the dict of an official experiment YAML
(`yaml.safe_load` of e.g. `seg_hrnet_ocr_w48_*.yaml`). Run this file directly
for a self-check against the official W48 configuration (parameter count and
number of state-dict entries).
"""

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.1
BN_EPS = 1e-5
OCR_DROPOUT = 0.05  # hard-coded in the official model (MODEL.OCR.DROPOUT is unused)


# ---------------------------------------------------------------------------
# configuration helpers

def _get(d, key, default=None):
    """Case-tolerant dict lookup (YAML keys are upper case)."""
    if d is None:
        return default
    if key in d:
        return d[key]
    low = key.lower()
    for k, v in d.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return default


def _model_cfg(cfg):
    return _get(cfg, "MODEL", {}) or {}


def align_corners_of(cfg):
    """MODEL.ALIGN_CORNERS, default True (lib/config/default.py)."""
    return bool(_get(_model_cfg(cfg), "ALIGN_CORNERS", True))


def num_classes_of(cfg):
    return int(_get(_get(cfg, "DATASET", {}), "NUM_CLASSES"))


def ignore_label_of(cfg):
    return int(_get(_get(cfg, "TRAIN", {}), "IGNORE_LABEL", 255))


def _stage_cfg(extra, name):
    """Normalised stage dict. STAGE1 may misspell NUM_BRANCHES as NUM_RANCHES;
    STAGE1 always has exactly one branch."""
    s = _get(extra, name)
    if s is None:
        raise KeyError(f"MODEL.EXTRA.{name} missing from the config")
    blocks = [int(b) for b in _get(s, "NUM_BLOCKS")]
    channels = [int(c) for c in _get(s, "NUM_CHANNELS")]
    if name == "STAGE1":
        branches = 1
    else:
        branches = int(_get(s, "NUM_BRANCHES"))
    if len(blocks) != branches or len(channels) != branches:
        raise ValueError(f"{name}: NUM_BLOCKS/NUM_CHANNELS do not match NUM_BRANCHES={branches}")
    block = str(_get(s, "BLOCK")).upper()
    if block not in BLOCKS:
        raise ValueError(f"{name}: unknown BLOCK {block}")
    fuse = str(_get(s, "FUSE_METHOD", "SUM")).upper()
    if fuse != "SUM":
        raise ValueError(f"{name}: only FUSE_METHOD SUM is supported")
    return {
        "num_modules": int(_get(s, "NUM_MODULES", 1)),
        "num_branches": branches,
        "block": block,
        "num_blocks": blocks,
        "num_channels": channels,
    }


def _bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv3x3(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


def _conv1x1(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=bias)


# ---------------------------------------------------------------------------
# residual blocks (spec 2.1)

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = _bn(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = _bn(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = _bn(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = _bn(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + residual)


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _make_blocks(block, inplanes, planes, num_blocks, stride=1):
    """Sequential of `num_blocks` blocks; block 0 gets a 1x1 conv + BN downsample
    when the stride or the channel count changes."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            _conv1x1(inplanes, planes * block.expansion, stride),
            _bn(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    for _ in range(1, num_blocks):
        layers.append(block(planes * block.expansion, planes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------
# HRNet multi-resolution module (spec 2.4)

class HighResolutionModule(nn.Module):
    def __init__(self, num_branches, block, num_blocks, num_inchannels, num_channels,
                 align_corners):
        super().__init__()
        self.num_branches = num_branches
        self.align_corners = align_corners
        self.num_inchannels = list(num_inchannels)
        self.branches = nn.ModuleList(
            _make_blocks(block, self.num_inchannels[b], num_channels[b], num_blocks[b])
            for b in range(num_branches)
        )
        # after the branches every width is C_b * expansion
        self.num_inchannels = [c * block.expansion for c in num_channels]
        self.fuse_layers = self._make_fuse_layers() if num_branches > 1 else None
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self):
        n = self.num_branches
        ch = self.num_inchannels
        fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    # lower resolution: 1x1 conv + BN, then bilinear upsample in forward
                    row.append(nn.Sequential(_conv1x1(ch[j], ch[i]), _bn(ch[i])))
                elif j == i:
                    row.append(None)
                else:
                    # higher resolution: (i-j) stride-2 3x3 convs; ReLU on all but the last
                    chain = []
                    for t in range(i - j):
                        if t == i - j - 1:
                            chain.append(nn.Sequential(_conv3x3(ch[j], ch[i], 2), _bn(ch[i])))
                        else:
                            chain.append(nn.Sequential(_conv3x3(ch[j], ch[j], 2), _bn(ch[j]),
                                                       nn.ReLU(inplace=False)))
                    row.append(nn.Sequential(*chain))
            fuse.append(row)
        return fuse

    def forward(self, xs):
        xs = [self.branches[b](xs[b]) for b in range(self.num_branches)]
        if self.num_branches == 1:
            return xs
        out = []
        for i in range(self.num_branches):
            hi, wi = xs[i].shape[-2:]
            y = None
            for j in range(self.num_branches):
                if j == i:
                    t = xs[j]
                elif j > i:
                    t = F.interpolate(self.fuse_layers[i][j](xs[j]), size=(hi, wi),
                                      mode="bilinear", align_corners=self.align_corners)
                else:
                    t = self.fuse_layers[i][j](xs[j])
                y = t if y is None else y + t
            out.append(self.relu(y))
        return out


# ---------------------------------------------------------------------------
# OCR head (spec 3)

class SpatialGather(nn.Module):
    """ocr_gather_head: soft object regions -> region representations.
    No parameters. Softmax over the pixels (per class), scale 1."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, feats, probs):
        n, k = probs.shape[:2]
        c = feats.shape[1]
        p = F.softmax(self.scale * probs.reshape(n, k, -1), dim=2)   # N x K x hw
        f = feats.reshape(n, c, -1).permute(0, 2, 1)                 # N x hw x C
        ctx = torch.matmul(p, f)                                      # N x K x C
        return ctx.permute(0, 2, 1).unsqueeze(3)                      # N x C x K x 1


def _bn_relu(c):
    """BNReLU stored as a 2-element Sequential (BN key gets an extra `.0`)."""
    return nn.Sequential(_bn(c), nn.ReLU(inplace=False))


class ObjectAttentionBlock2D(nn.Module):
    """object_context_block, scale 1 (no pooling / resizing)."""

    def __init__(self, in_channels, key_channels):
        super().__init__()
        self.key_channels = key_channels
        self.f_pixel = nn.Sequential(
            _conv1x1(in_channels, key_channels), _bn_relu(key_channels),
            _conv1x1(key_channels, key_channels), _bn_relu(key_channels))
        self.f_object = nn.Sequential(
            _conv1x1(in_channels, key_channels), _bn_relu(key_channels),
            _conv1x1(key_channels, key_channels), _bn_relu(key_channels))
        self.f_down = nn.Sequential(_conv1x1(in_channels, key_channels), _bn_relu(key_channels))
        self.f_up = nn.Sequential(_conv1x1(key_channels, in_channels), _bn_relu(in_channels))

    def forward(self, x, proxy):
        n, _, h, w = x.shape
        kc = self.key_channels
        query = self.f_pixel(x).reshape(n, kc, -1).permute(0, 2, 1)      # N x hw x KEY
        key = self.f_object(proxy).reshape(n, kc, -1)                    # N x KEY x K
        value = self.f_down(proxy).reshape(n, kc, -1).permute(0, 2, 1)   # N x K x KEY
        sim = torch.matmul(query, key) * (kc ** -0.5)
        sim = F.softmax(sim, dim=-1)                                     # over the K regions
        ctx = torch.matmul(sim, value)                                   # N x hw x KEY
        ctx = ctx.permute(0, 2, 1).reshape(n, kc, h, w)
        return self.f_up(ctx)


class SpatialOCR(nn.Module):
    """ocr_distri_head: object context, then concat [object_context, pixel feats]
    -> 1x1 conv -> BNReLU -> Dropout2d."""

    def __init__(self, in_channels, key_channels, out_channels, dropout=OCR_DROPOUT):
        super().__init__()
        self.object_context_block = ObjectAttentionBlock2D(in_channels, key_channels)
        self.conv_bn_dropout = nn.Sequential(
            _conv1x1(2 * in_channels, out_channels),
            _bn_relu(out_channels),
            nn.Dropout2d(dropout),
        )

    def forward(self, feats, proxy):
        context = self.object_context_block(feats, proxy)
        return self.conv_bn_dropout(torch.cat([context, feats], dim=1))


# ---------------------------------------------------------------------------
# full model

class HRNetOCR(nn.Module):
    def __init__(self, cfg, dropout=OCR_DROPOUT):
        super().__init__()
        mcfg = _model_cfg(cfg)
        extra = _get(mcfg, "EXTRA")
        ocr = _get(mcfg, "OCR", {}) or {}
        self.align_corners = align_corners_of(cfg)
        self.num_classes = num_classes_of(cfg)
        mid = int(_get(ocr, "MID_CHANNELS", 512))
        key = int(_get(ocr, "KEY_CHANNELS", 256))
        self.mid_channels, self.key_channels = mid, key

        # stem (width fixed at 64)
        self.conv1 = _conv3x3(3, 64, 2)
        self.bn1 = _bn(64)
        self.conv2 = _conv3x3(64, 64, 2)
        self.bn2 = _bn(64)
        self.relu = nn.ReLU(inplace=False)

        # stage 1
        s1 = _stage_cfg(extra, "STAGE1")
        b1 = BLOCKS[s1["block"]]
        self.layer1 = _make_blocks(b1, 64, s1["num_channels"][0], s1["num_blocks"][0])
        pre = [s1["num_channels"][0] * b1.expansion]

        # stages 2..4 with their transitions
        self.stage_cfgs = []
        for s in (2, 3, 4):
            sc = _stage_cfg(extra, f"STAGE{s}")
            blk = BLOCKS[sc["block"]]
            cur = [c * blk.expansion for c in sc["num_channels"]]
            setattr(self, f"transition{s - 1}", self._make_transition(pre, cur))
            stage, pre = self._make_stage(sc, cur)
            setattr(self, f"stage{s}", stage)
            self.stage_cfgs.append(sc)
        ccat = sum(pre)
        self.feat_channels = ccat

        # OCR head
        self.conv3x3_ocr = nn.Sequential(
            _conv3x3(ccat, mid, bias=True), _bn(mid), nn.ReLU(inplace=False))
        self.ocr_gather_head = SpatialGather(scale=1.0)
        self.ocr_distri_head = SpatialOCR(mid, key, mid, dropout=dropout)
        self.cls_head = _conv1x1(mid, self.num_classes, bias=True)
        self.aux_head = nn.Sequential(
            _conv1x1(ccat, ccat, bias=True), _bn(ccat), nn.ReLU(inplace=False),
            _conv1x1(ccat, self.num_classes, bias=True))

    @staticmethod
    def _make_transition(pre, cur):
        layers = []
        for i in range(len(cur)):
            if i < len(pre):
                if cur[i] != pre[i]:
                    layers.append(nn.Sequential(_conv3x3(pre[i], cur[i]), _bn(cur[i]),
                                                nn.ReLU(inplace=False)))
                else:
                    layers.append(None)
            else:
                chain = []
                n_units = i + 1 - len(pre)
                for t in range(n_units):
                    cin = pre[-1]
                    cout = cur[i] if t == n_units - 1 else cin
                    chain.append(nn.Sequential(_conv3x3(cin, cout, 2), _bn(cout),
                                               nn.ReLU(inplace=False)))
                layers.append(nn.Sequential(*chain))
        return nn.ModuleList(layers)

    def _make_stage(self, sc, inchannels):
        blk = BLOCKS[sc["block"]]
        modules = []
        ch = list(inchannels)
        for _ in range(sc["num_modules"]):
            m = HighResolutionModule(sc["num_branches"], blk, sc["num_blocks"], ch,
                                     sc["num_channels"], self.align_corners)
            modules.append(m)
            ch = m.num_inchannels
        return nn.Sequential(*modules), ch

    @staticmethod
    def _apply_transition(transition, xs):
        out = []
        for i, t in enumerate(transition):
            if i < len(xs):
                out.append(xs[i] if t is None else t(xs[i]))
            else:
                out.append(t(xs[-1]))   # new branch from the lowest-resolution branch
        return out

    def backbone(self, x):
        """Stem + 4 stages + concat [x0, up(x1), up(x2), up(x3)] (spec 2.5)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for s in (2, 3, 4):
            xs = self._apply_transition(getattr(self, f"transition{s - 1}"), xs)
            xs = getattr(self, f"stage{s}")(xs)
        h, w = xs[0].shape[-2:]
        ups = [xs[0]] + [F.interpolate(t, size=(h, w), mode="bilinear",
                                       align_corners=self.align_corners) for t in xs[1:]]
        return torch.cat(ups, dim=1)

    def forward_with_intermediates(self, x):
        feats = self.backbone(x)
        aux = self.aux_head(feats)
        f = self.conv3x3_ocr(feats)
        context = self.ocr_gather_head(f, aux)
        ocr_feats = self.ocr_distri_head(f, context)
        out = self.cls_head(ocr_feats)
        return {"aux": aux, "out": out, "feats": feats, "pixel": f,
                "context": context, "ocr_feats": ocr_feats}

    def forward(self, x):
        r = self.forward_with_intermediates(x)
        return [r["aux"], r["out"]]


def set_dropout(model, p):
    """Set the p of the OCR Dropout2d (p = 0 disables it, as `--no-dropout`)."""
    model.ocr_distri_head.conv_bn_dropout[2].p = p


# ---------------------------------------------------------------------------
# loss (spec 4, cross entropy)

def hrnet_ocr_loss(aux, out, label, cfg, class_weights=None, return_terms=False):
    """0.4 * CE(aux) + 1.0 * CE(out); each logit map is bilinearly resized to the
    label size (align_corners from cfg) when the sizes differ. CE uses
    ignore_index = TRAIN.IGNORE_LABEL (default 255), mean reduction (weighted
    mean when class_weights is given). The weights come from
    LOSS.BALANCE_WEIGHTS (default [0.4, 1]); the first goes with aux."""
    align = align_corners_of(cfg)
    ignore = ignore_label_of(cfg)
    bw = _get(_get(cfg, "LOSS", {}), "BALANCE_WEIGHTS", [0.4, 1.0]) or [0.4, 1.0]
    size = label.shape[-2:]
    terms = []
    for logits in (aux, out):
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=align)
        w = None if class_weights is None else class_weights.to(logits.dtype)
        terms.append(F.cross_entropy(logits, label, weight=w, ignore_index=ignore))
    total = float(bw[0]) * terms[0] + float(bw[1]) * terms[1]
    if return_terms:
        return total, terms
    return total


# ---------------------------------------------------------------------------
# self-check

W48_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                        "official", "cityscapes",
                        "seg_hrnet_ocr_w48_train_512x1024_sgd_lr1e-2_wd5e-4_bs_12_epoch484.yaml")


def load_cfg(path):
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)


def _self_check(path):
    cfg = load_cfg(path)
    model = HRNetOCR(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    sd = model.state_dict()
    backbone = sum(p.numel() for k, p in model.named_parameters()
                   if not k.startswith(("conv3x3_ocr", "ocr_", "cls_head", "aux_head")))
    print(f"config: {path}")
    print(f"parameters: {n_params} ({n_params / 1e6:.2f} M; backbone {backbone / 1e6:.2f} M, "
          f"head {(n_params - backbone) / 1e6:.2f} M)")
    print(f"state-dict entries: {len(sd)}")
    assert abs(n_params - 70.37e6) <= 0.01e6, n_params
    assert len(sd) == 1890, len(sd)

    # spot-check some key shapes from spec 7.3
    expect = {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (48, 256, 3, 3),
        "transition1.1.0.0.weight": (96, 256, 3, 3),
        "transition2.2.0.0.weight": (192, 96, 3, 3),
        "transition3.3.0.0.weight": (384, 192, 3, 3),
        "stage4.0.fuse_layers.3.0.2.0.weight": (384, 48, 3, 3),
        "stage2.0.fuse_layers.1.0.0.0.weight": (96, 48, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (48, 96, 1, 1),
        "conv3x3_ocr.0.weight": (512, 720, 3, 3),
        "conv3x3_ocr.0.bias": (512,),
        "ocr_distri_head.object_context_block.f_pixel.3.0.running_var": (256,),
        "ocr_distri_head.object_context_block.f_up.1.0.weight": (512,),
        "ocr_distri_head.conv_bn_dropout.0.weight": (512, 1024, 1, 1),
        "ocr_distri_head.conv_bn_dropout.1.0.num_batches_tracked": (),
        "cls_head.weight": (19, 512, 1, 1),
        "cls_head.bias": (19,),
        "aux_head.0.weight": (720, 720, 1, 1),
        "aux_head.0.bias": (720,),
        "aux_head.3.weight": (19, 720, 1, 1),
        "aux_head.3.bias": (19,),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape), shape)
    for k in ("transition2.0.0.weight", "transition2.1.0.weight", "transition3.0.0.weight"):
        assert k not in sd, k
    biases = sorted(k for k in sd if k.endswith(".bias") and not _is_bn_key(model, k))
    assert biases == ["aux_head.0.bias", "aux_head.3.bias", "cls_head.bias",
                      "conv3x3_ocr.0.bias"], biases

    # small forward on an odd size: shapes only
    model.eval()
    with torch.no_grad():
        aux, out = model(torch.zeros(1, 3, 70, 98))
    assert tuple(aux.shape) == (1, 19, 18, 25) and tuple(out.shape) == (1, 19, 18, 25)
    print("W48 self-check OK")


def _is_bn_key(model, key):
    mod = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(mod, nn.BatchNorm2d)


if __name__ == "__main__":
    _self_check(sys.argv[1] if len(sys.argv) > 1 else W48_YAML)
