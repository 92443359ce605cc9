#!/usr/bin/env python3
"""mmsegmentation's OCRNet with an HRNet backbone, in plain PyTorch, and a checkpoint of it.

Written from open-mmlab/mmsegmentation (`mmseg/models/backbones/hrnet.py` and the
`BasicBlock` / `Bottleneck` of `backbones/resnet.py`; `decode_heads/decode_head.py`,
`fcn_head.py`, `ocr_head.py`, `cascade_decode_head.py`; `utils/self_attention_block.py`
and `utils/wrappers.py`; `segmentors/cascade_encoder_decoder.py`; the model of
`configs/_base_/models/ocrnet_hr18.py`). Module attributes carry mmsegmentation's names, so
`state_dict()` has the keys of its model zoo's `ocrnet_hr*` checkpoints, and the arithmetic
is mmsegmentation's where it differs from the official HRNet-OCR code:

* every bilinear resize has `align_corners=False` (the fuse layers, `resize_concat` of both
  heads, the final resize to the input);
* a fuse layer upsamples with mmsegmentation's `Upsample(scale_factor=2**(j-i))` (an explicit
  size of `int(t * scale)`), then the module resizes to the branch's size: two resizes where
  a stride-2 convolution rounded an odd size up;
* `ConvModule`s before a norm have no bias (the OCR head's `bottleneck`, the FCN head's conv);
* no dropout before `conv_seg` (`dropout_ratio=-1`).

The model is the micro one of `tests/fixtures/model/micro_ocr.yaml` (the same widths and
block counts as HRNet's `extra` dict; the FCN head's `channels` is the concat's width, the
OCR head's `channels` `MODEL.OCR.MID_CHANNELS` and `ocr_channels` `KEY_CHANNELS`), with
random weights and running statistics, in eval mode.

Writes, under `tests/fixtures/model/`:
* `mmseg_micro_ocrnet.pth`: the checkpoint as mmsegmentation's `save_checkpoint` writes one,
  `{'meta': {mmseg_version, config, CLASSES, PALETTE, epoch, iter}, 'state_dict': ...}`,
  with `num_batches_tracked` (int64) as SyncBN keeps it;
* `mmseg_micro_logits.safetensors`: `input` [1, 3, H, W] with H and W whose quarter is odd
  (so the fuse layers take their two-resize path), `aux` (the FCN head) and `out` (the OCR
  head) [1, K, H', W'] at the backbone's resolution, and `logits` [1, K, H, W] as
  `encode_decode` returns them.

With `--check-mmseg`, also builds mmsegmentation's own model from the installed package
(`pip install mmsegmentation mmcv-lite mmengine`; not needed otherwise), loads the checkpoint
into it, and reports the largest difference of its logits from these.

    python3 tools/reference/mmseg_ocrnet.py [--seed N] [--check-mmseg]
"""

import argparse
import collections
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
from hrnet_ocr import _get, _stage_cfg, load_cfg, num_classes_of  # noqa: E402


def resize(x, size):
    """mmseg's `resize` as every OCRNet call makes it: bilinear, align_corners=False."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """mmcv's ConvModule with a BN norm and ReLU: `conv` (no bias before a norm), `bn`."""

    def __init__(self, cin, cout, k, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Upsample(nn.Module):
    """mmseg's Upsample with a scale factor: an explicit size of int(t * scale)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x):
        return resize(x, [int(t * self.scale) for t in x.shape[-2:]])


def conv_bn(cin, cout, k, stride, relu):
    layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def make_layer(block, inplanes, planes, blocks):
    downsample = None
    if inplanes != planes * block.expansion:
        downsample = conv_bn(inplanes, planes * block.expansion, 1, 1, relu=False)
    layers = [block(inplanes, planes, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    def __init__(self, block, num_blocks, in_channels, num_channels):
        super().__init__()
        self.branches = nn.ModuleList(
            make_layer(block, cin, c, n) for cin, c, n in zip(in_channels, num_channels, num_blocks)
        )
        width = [c * block.expansion for c in num_channels]
        n = len(width)
        self.fuse_layers = None
        if n > 1:
            rows = []
            for i in range(n):
                row = []
                for j in range(n):
                    if j > i:
                        row.append(nn.Sequential(
                            nn.Conv2d(width[j], width[i], 1, bias=False), nn.BatchNorm2d(width[i]),
                            Upsample(2 ** (j - i))))
                    elif j == i:
                        row.append(None)
                    else:
                        steps = [conv_bn(width[j], width[j], 3, 2, relu=True) for _ in range(i - j - 1)]
                        steps.append(conv_bn(width[j], width[i], 3, 2, relu=False))
                        row.append(nn.Sequential(*steps))
                rows.append(nn.ModuleList(row))
            self.fuse_layers = nn.ModuleList(rows)

    def forward(self, x):
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        if self.fuse_layers is None:
            return x
        fused = []
        for i in range(len(self.fuse_layers)):
            y = 0
            for j in range(len(x)):
                if i == j:
                    y += x[j]
                elif j > i:
                    y = y + resize(self.fuse_layers[i][j](x[j]), x[i].shape[2:])
                else:
                    y += self.fuse_layers[i][j](x[j])
            fused.append(F.relu(y))
        return fused


class HRNet(nn.Module):
    def __init__(self, stages):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        s1 = stages[0]
        block = BLOCKS[s1["block"]]
        self.layer1 = make_layer(block, 64, s1["num_channels"][0], s1["num_blocks"][0])
        pre = [s1["num_channels"][0] * block.expansion]
        for s in (2, 3, 4):
            cfg = stages[s - 1]
            block = BLOCKS[cfg["block"]]
            cur = [c * block.expansion for c in cfg["num_channels"]]
            setattr(self, f"transition{s - 1}", self.make_transition(pre, cur))
            modules = [HRModule(block, cfg["num_blocks"], cur, cfg["num_channels"]) for _ in range(cfg["num_modules"])]
            setattr(self, f"stage{s}", nn.Sequential(*modules))
            pre = cur
        self.stage_branches = [stages[s]["num_branches"] for s in (1, 2, 3)]

    @staticmethod
    def make_transition(pre, cur):
        layers = []
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(conv_bn(pre[i], c, 3, 1, relu=True) if c != pre[i] else None)
            else:
                steps = [conv_bn(pre[-1], c if k == i - len(pre) else pre[-1], 3, 2, relu=True)
                         for k in range(i + 1 - len(pre))]
                layers.append(nn.Sequential(*steps))
        return nn.ModuleList(layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        y = [self.layer1(x)]
        for s, branches in zip((2, 3, 4), self.stage_branches):
            transition = getattr(self, f"transition{s - 1}")
            # mmseg feeds every transition from the last branch; for new branches (the only
            # ones HRNet configs transform) that is the official rule too.
            xs = [y[i] if transition[i] is None else transition[i](y[-1]) for i in range(branches)]
            y = getattr(self, f"stage{s}")(xs)
        return y


def resize_concat(inputs):
    return torch.cat([resize(x, inputs[0].shape[2:]) for x in inputs], dim=1)


class FCNHead(nn.Module):
    """num_convs=1, kernel_size=1, concat_input=False, dropout_ratio=-1."""

    def __init__(self, in_channels, channels, num_classes):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 1))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs):
        return self.conv_seg(self.convs(resize_concat(inputs)))


class ObjectAttentionBlock(nn.Module):
    """mmseg's SelfAttentionBlock as OCR configures it (scale 1: no downsampling), then its
    `bottleneck` over [context, query features]."""

    def __init__(self, in_channels, channels):
        super().__init__()
        self.channels = channels
        self.key_project = nn.Sequential(ConvModule(in_channels, channels, 1), ConvModule(channels, channels, 1))
        self.query_project = nn.Sequential(ConvModule(in_channels, channels, 1), ConvModule(channels, channels, 1))
        self.value_project = ConvModule(in_channels, channels, 1)
        self.out_project = ConvModule(channels, in_channels, 1)
        self.bottleneck = ConvModule(in_channels * 2, in_channels, 1)

    def forward(self, query_feats, key_feats):
        n = query_feats.size(0)
        query = self.query_project(query_feats)
        query = query.reshape(*query.shape[:2], -1).permute(0, 2, 1)
        key = self.key_project(key_feats)
        value = self.value_project(key_feats)
        key = key.reshape(*key.shape[:2], -1)
        value = value.reshape(*value.shape[:2], -1).permute(0, 2, 1)
        sim = F.softmax((self.channels ** -0.5) * torch.matmul(query, key), dim=-1)
        context = torch.matmul(sim, value).permute(0, 2, 1).contiguous()
        context = self.out_project(context.reshape(n, -1, *query_feats.shape[2:]))
        return self.bottleneck(torch.cat([context, query_feats], dim=1))


class OCRHead(nn.Module):
    def __init__(self, in_channels, channels, ocr_channels, num_classes):
        super().__init__()
        self.object_context_block = ObjectAttentionBlock(channels, ocr_channels)
        self.bottleneck = ConvModule(in_channels, channels, 3, padding=1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs, prev_output):
        feats = self.bottleneck(resize_concat(inputs))
        # SpatialGatherModule, scale 1.
        n, k = prev_output.shape[:2]
        probs = F.softmax(prev_output.reshape(n, k, -1), dim=2)
        context = torch.matmul(probs, feats.reshape(n, feats.shape[1], -1).permute(0, 2, 1))
        context = context.permute(0, 2, 1).contiguous().unsqueeze(3)
        return self.conv_seg(self.object_context_block(feats, context))


class OCRNet(nn.Module):
    """CascadeEncoderDecoder: backbone, decode_head[0] (FCN), decode_head[1] (OCR)."""

    def __init__(self, cfg):
        super().__init__()
        model = _get(cfg, "MODEL")
        extra, ocr = _get(model, "EXTRA"), _get(model, "OCR")
        stages = [_stage_cfg(extra, f"STAGE{s}") for s in (1, 2, 3, 4)]
        self.backbone = HRNet(stages)
        width = sum(c * BLOCKS[stages[3]["block"]].expansion for c in stages[3]["num_channels"])
        classes = num_classes_of(cfg)
        self.decode_head = nn.ModuleList([
            FCNHead(width, width, classes),
            OCRHead(width, int(_get(ocr, "MID_CHANNELS")), int(_get(ocr, "KEY_CHANNELS")), classes),
        ])

    def heads(self, img):
        x = self.backbone(img)
        aux = self.decode_head[0](x)
        return aux, self.decode_head[1](x, aux)

    def forward(self, img):
        return resize(self.heads(img)[1], img.shape[2:])


def randomise(model, gen):
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith("num_batches_tracked"):
            t.fill_(1234)
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif name.endswith("running_mean"):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        elif name.endswith(".weight") and t.dim() == 1:
            t.copy_(1.0 + torch.randn(t.shape, generator=gen) * 0.1)
        elif t.dim() == 1:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        else:
            fan_in = t[0].numel() if t.dim() > 1 else 1
            t.copy_(torch.randn(t.shape, generator=gen) / fan_in ** 0.5)


def check_with_mmseg(cfg, state, img, logits):
    """Builds mmsegmentation's own model of the same shape and compares its logits."""
    import types

    class CompiledOps(types.ModuleType):
        """mmcv-lite has no compiled `mmcv.ops`; OCRNet uses none, but other heads import them."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (nn.Module,), {})

    sys.modules.setdefault("mmcv.ops", CompiledOps("mmcv.ops"))
    from mmseg.models import build_segmentor  # noqa: WPS433 (optional dependency)
    from mmseg.utils import register_all_modules
    register_all_modules()
    model = _get(cfg, "MODEL")
    extra, ocr = _get(model, "EXTRA"), _get(model, "OCR")
    stages = [_stage_cfg(extra, f"STAGE{s}") for s in (1, 2, 3, 4)]
    norm = dict(type="BN", requires_grad=True)
    channels = [c for c in stages[3]["num_channels"]]
    head = dict(in_channels=channels, in_index=tuple(range(4)), input_transform="resize_concat",
                dropout_ratio=-1, num_classes=num_classes_of(cfg), norm_cfg=norm, align_corners=False)
    mm = build_segmentor(dict(
        type="CascadeEncoderDecoder", num_stages=2,
        backbone=dict(type="HRNet", norm_cfg=norm, norm_eval=False, extra={
            f"stage{i + 1}": dict(num_modules=s["num_modules"], num_branches=s["num_branches"],
                                  block=s["block"], num_blocks=tuple(s["num_blocks"]),
                                  num_channels=tuple(s["num_channels"])) for i, s in enumerate(stages)}),
        decode_head=[
            dict(type="FCNHead", channels=sum(channels), kernel_size=1, num_convs=1, concat_input=False, **head),
            dict(type="OCRHead", channels=int(_get(ocr, "MID_CHANNELS")),
                 ocr_channels=int(_get(ocr, "KEY_CHANNELS")), **head),
        ],
        train_cfg=dict(), test_cfg=dict(mode="whole")))
    missing, unexpected = mm.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    mm.eval()
    with torch.no_grad():
        theirs = mm.encode_decode(img, [dict(img_shape=img.shape[2:], pad_shape=img.shape[2:])])
    diff = (theirs - logits).abs().max().item()
    print(f"mmsegmentation's own model: largest logit difference {diff:.3g}")
    assert diff < 1e-5, diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/model"))
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--size", type=int, nargs=2, default=[52, 44], metavar=("H", "W"))
    parser.add_argument("--check-mmseg", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    cfg = load_cfg(os.path.join(REPO, "tests/fixtures/model/micro_ocr.yaml"))
    model = OCRNet(cfg).eval()
    with torch.no_grad():
        randomise(model, gen)
    img = torch.randn(1, 3, *args.size, generator=gen)
    with torch.no_grad():
        aux, out = model.heads(img)
        logits = model(img)
    state = collections.OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    classes = num_classes_of(cfg)
    meta = {
        "mmseg_version": "0.5.0+micro",
        "config": "# a micro OCRNet (tools/reference/mmseg_ocrnet.py)\n",
        "CLASSES": tuple(f"class{c}" for c in range(classes)),
        "PALETTE": [[17 * c, 255 - 17 * c, 128] for c in range(classes)],
        "epoch": 1,
        "iter": 40000,
    }
    torch.save({"meta": meta, "state_dict": state}, os.path.join(args.out, "mmseg_micro_ocrnet.pth"))
    save_file({"input": img.contiguous(), "aux": aux.contiguous(), "out": out.contiguous(),
               "logits": logits.contiguous()}, os.path.join(args.out, "mmseg_micro_logits.safetensors"))
    quarter = list(aux.shape[2:])
    print(f"{len(state)} tensors; input {list(img.shape)}, heads at {quarter}, logits {list(logits.shape)}")
    if args.check_mmseg:
        check_with_mmseg(cfg, state, img, logits)


if __name__ == "__main__":
    main()
