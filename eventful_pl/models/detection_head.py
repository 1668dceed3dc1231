"""Faster R-CNN head of ViTDet, built from torchvision's detection modules.

Configured like detectron2's ViTDet recipe (``mask_rcnn_vitdet_b`` without the
mask branch, as used for ImageNet VID):

- RPN on p2..p6: two 3 x 3 convs with ReLU (detectron2 ViTDet's
  ``StandardRPNHead(conv_dims=[-1, -1])``; ``rpn_conv_depth``), anchors of size
  32..512 (one per level) with aspect ratios 0.5 / 1 / 2, centred on the
  feature-map cell corners (offset 0) and *not* rounded (detectron2's anchors;
  torchvision rounds); IoU thresholds 0.3 / 0.7, 256 anchors per image,
  2000 / 1000 proposals before / after NMS (0.7) in training, 1000 / 300 at
  test (the original eventful-transformer VID detector's ``post_nms_topk``;
  detectron2's COCO ``mask_rcnn_vitdet_b`` keeps 1000);
- RoIAlign 7 x 7 with ``aligned=True`` ("ROIAlignV2") on p2..p5, boxes
  assigned to levels by detectron2's rule (canonical size 224 at p4);
- box head: 4 convolutions 3 x 3 (256, LayerNorm, ReLU) and one fc (1024, ReLU);
- predictor: class scores with background at index 0 (torchvision's order;
  detectron2 checkpoints put it last and are converted on load) and
  class-specific box deltas (weights 10, 10, 5, 5); 512 RoIs per image, 25%
  foreground, test score threshold 0.05, NMS 0.5, 100 detections.

Known difference: the box-regression losses are torchvision's smooth-L1
(beta 1/9); detectron2's ViTDet uses L1. Inference is identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import roi_align


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) maps (detectron2's ``LayerNorm``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class UnroundedAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator with detectron2's exact (unrounded) anchor sizes."""

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        ws = (scales_t[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales_t[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class LevelRoIAlign(nn.Module):
    """Multi-level RoIAlign with ``aligned=True`` and detectron2's level assignment.

    A box of size ``s = sqrt(area)`` goes to level
    ``floor(canonical_level + log2(s / canonical_size + 1e-8))``, clamped to
    the given levels.

    Args:
        featmap_names: Pyramid levels to pool from, finest first (e.g. p2..p5).
        strides: Their strides in pixels (e.g. 4, 8, 16, 32).
        output_size: Pooled size.
        sampling_ratio: RoIAlign sampling ratio (0: adaptive).
        canonical_size: Box size assigned to ``canonical_level``.
        canonical_level: Level (log2 stride) of ``canonical_size``.

    Shapes: features {name: (B, C, H, W)}, boxes [(R_i, 4) xyxy] -> (sum R_i, C, s, s).
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        strides: Sequence[int],
        output_size: int = 7,
        sampling_ratio: int = 0,
        canonical_size: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError("featmap_names and strides must have the same length")
        self.featmap_names = list(featmap_names)
        self.strides = list(strides)
        self.levels = [int(math.log2(s)) for s in strides]
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_size = canonical_size
        self.canonical_level = canonical_level

    def forward(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        maps = [features[name] for name in self.featmap_names]
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)]
        )
        sizes = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
        level = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_size + 1e-8))
        level = level.clamp(self.levels[0], self.levels[-1]).long() - self.levels[0]
        out = maps[0].new_zeros(len(rois), maps[0].shape[1], self.output_size, self.output_size)
        for i, (feature, stride) in enumerate(zip(maps, self.strides)):  # pyramid levels
            index = torch.nonzero(level == i).squeeze(1)
            if index.numel():
                out[index] = roi_align(
                    feature,
                    rois[index],
                    self.output_size,
                    spatial_scale=1.0 / stride,
                    sampling_ratio=self.sampling_ratio,
                    aligned=True,
                )
        return out


class ConvFCBoxHead(nn.Module):
    """detectron2's ``FastRCNNConvFCHead``: convs 3 x 3 with LayerNorm and ReLU, then fcs.

    Args:
        in_channels: Pooled feature channels.
        pooled_size: Pooled size s.
        conv_dims: Channels of each convolution.
        fc_dims: Features of each fully connected layer.

    Shapes: (R, C, s, s) -> (R, fc_dims[-1]).
    """

    def __init__(
        self,
        in_channels: int = 256,
        pooled_size: int = 7,
        conv_dims: Sequence[int] = (256, 256, 256, 256),
        fc_dims: Sequence[int] = (1024,),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for dim in conv_dims:
            layers += [
                nn.Conv2d(channels, dim, 3, padding=1, bias=False),
                LayerNorm2d(dim, eps=1e-6),
                nn.ReLU(inplace=True),
            ]
            channels = dim
        self.convs = nn.Sequential(*layers)
        features = channels * pooled_size * pooled_size
        fcs: list[nn.Module] = []
        for dim in fc_dims:
            fcs += [nn.Linear(features, dim), nn.ReLU(inplace=True)]
            features = dim
        self.fcs = nn.Sequential(*fcs)
        self.out_features = features
        for m in self.modules():  # detectron2's initialisation (c2_msra_fill / c2_xavier_fill)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fcs(self.convs(x).flatten(1))


class FasterRCNNHead(nn.Module):
    """RPN + RoI heads over a feature pyramid (see the module docstring for settings).

    Args:
        num_classes: Object classes K (without background).
        in_channels: Pyramid channels.
        strides: Strides of the pyramid levels p2..p6.
        anchor_sizes: One anchor size per level.
        aspect_ratios: Anchor aspect ratios (height / width).
        box_conv_dims: Box-head convolution channels.
        box_fc_dims: Box-head fully connected features.
        rpn_conv_depth: 3 x 3 convolutions (each with ReLU) of the RPN head
            (2 in detectron2's ViTDet, 1 in its classic FPN configs).
        rpn_pre_nms_top_n: Proposals per level kept before NMS, (training, test).
        rpn_post_nms_top_n: Proposals per image kept after NMS, (training, test).

    Shapes: features {"p2".. "p6": (B, C, H_l, W_l)}, padded image size (S, S),
    image_sizes [(h_i, w_i)] -> training: dict of losses; eval: per image
    {"boxes" (n, 4), "scores" (n,), "labels" (n,) in 1..K}, in resized-image pixels.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        box_conv_dims: Sequence[int] = (256, 256, 256, 256),
        box_fc_dims: Sequence[int] = (1024,),
        rpn_conv_depth: int = 2,
        rpn_pre_nms_top_n: Sequence[int] = (2000, 1000),
        rpn_post_nms_top_n: Sequence[int] = (1000, 300),
    ) -> None:
        super().__init__()
        if len(strides) != len(anchor_sizes):
            raise ValueError("strides and anchor_sizes need one entry per pyramid level")
        if (
            isinstance(rpn_conv_depth, bool)
            or not isinstance(rpn_conv_depth, int)
            or rpn_conv_depth < 1
        ):
            raise ValueError(f"rpn_conv_depth must be an integer >= 1, got {rpn_conv_depth!r}")
        for name, value in (
            ("rpn_pre_nms_top_n", rpn_pre_nms_top_n),
            ("rpn_post_nms_top_n", rpn_post_nms_top_n),
        ):
            if len(value) != 2 or any(int(v) < 1 for v in value):
                raise ValueError(f"{name} must be (training, test) counts >= 1, got {value!r}")
        self.num_classes = num_classes
        self.level_names = [f"p{int(math.log2(s))}" for s in strides]
        anchors = UnroundedAnchorGenerator(
            tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes)
        )
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(in_channels, len(aspect_ratios), conv_depth=rpn_conv_depth),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={
                "training": int(rpn_pre_nms_top_n[0]),
                "testing": int(rpn_pre_nms_top_n[1]),
            },
            post_nms_top_n={
                "training": int(rpn_post_nms_top_n[0]),
                "testing": int(rpn_post_nms_top_n[1]),
            },
            nms_thresh=0.7,
        )
        box_head = ConvFCBoxHead(in_channels, 7, box_conv_dims, box_fc_dims)
        self.roi_heads = RoIHeads(
            LevelRoIAlign(self.level_names[:-1], strides[:-1], output_size=7),
            box_head,
            FastRCNNPredictor(box_head.out_features, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=512,
            positive_fraction=0.25,
            bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=100,
        )
        predictor = self.roi_heads.box_predictor
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)

    def forward(
        self,
        images,  # torchvision ImageList: padded batch + resized sizes
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        proposals, rpn_losses = self.rpn(images, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return detections
