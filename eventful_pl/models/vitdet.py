"""ViTDet for video object detection, with an eventful ViT backbone (docs/models.md).

Each call processes one frame per stream (a batch holds B independent
streams); :meth:`ViTDet.reset` starts new streams (e.g. at each video
segment). Only the Transformer backbone is eventful; the feature pyramid and
the Faster R-CNN head run on every frame.

    model = create_vitdet("vitdet_b_vid", variant="eventful", policy=TopRPolicy(256)).eval()
    model.reset()
    for frame in video:                     # frame (B, 3, H, W) uint8, or a list of (3, H, W)
        detections = model(frame)           # [{"boxes", "scores", "labels"}] per stream

Training (``model.train()``) takes ``targets`` (one dict of ``boxes`` (n, 4) xyxy
pixels of the input image and ``labels`` (n,) in 0..K-1 per image) and returns
the RPN and box-head losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from eventful_pl.backbone import ViTBackbone
from eventful_pl.blocks import LN_EPS, to_pair
from eventful_pl.models.detection_head import FasterRCNNHead, LayerNorm2d
from eventful_pl.models.vit import PatchEmbedding
from eventful_pl.policies import TokenPolicy

#: The keys of :data:`VITDET_VARIANTS` (the command line lists them as choices).
ViTDetVariant = Literal["dense", "eventful", "tokenwise", "stgt", "spatial", "spatiotemporal"]
#: The keys of :data:`VITDET_PRESETS`.
ViTDetPreset = Literal["vitdet_b_vid", "vitdet_b_vid_672", "vitdet_b_coco", "vitdet_tiny"]

#: Backbone settings of each variant of the paper (docs/models.md; ViTBackbone kwargs).
VITDET_VARIANTS: dict[str, dict[str, Any]] = {
    # The base model.
    "dense": {"block_variant": "dense"},
    # The method: full eventful global blocks, token-wise eventful windowed blocks.
    "eventful": {"block_variant": "full", "window_block_variant": "tokenwise"},
    # Token-wise eventful blocks only (no attention reuse).
    "tokenwise": {"block_variant": "tokenwise"},
    # STGT baseline: token-wise blocks with STGT gates.
    "stgt": {"block_variant": "tokenwise", "stgt": True},
    # Spatial redundancy only: dense blocks, keys/values pooled 2 x 2 in global blocks.
    "spatial": {"block_variant": "dense", "pool_size": 2},
    # Spatiotemporal: the method plus 2 x 2 key/value pooling in global blocks.
    "spatiotemporal": {
        "block_variant": "full",
        "window_block_variant": "tokenwise",
        "pool_size": 2,
    },
}


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-16 map to strides 4, 8, 16, 32 (+ 64).

    Scale 4: deconv 2x2 (D/2), LayerNorm-2d, GELU, deconv 2x2 (D/4); scale 2:
    deconv 2x2 (D/2); scale 1: identity; scale 0.5: max-pool 2x2. Each then
    has a 1x1 conv and a 3x3 conv to ``out_channels`` (no bias, LayerNorm-2d
    after each). p6 is p5 max-pooled with stride 2 (detectron2's LastLevelMaxPool).

    Shapes: (B, D, h, w) -> {"p2": (B, C, 4h, 4w), "p3", "p4", "p5", "p6": (B, C, h/4, w/4)}.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        patch_stride: int = 16,
    ) -> None:
        super().__init__()
        self.names: list[str] = []
        stages = []
        for scale in scale_factors:
            if scale == 4.0:
                mid = dim // 4
                layers: list[nn.Module] = [
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    LayerNorm2d(dim // 2, eps=LN_EPS),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, mid, 2, stride=2),
                ]
            elif scale == 2.0:
                mid = dim // 2
                layers = [nn.ConvTranspose2d(dim, mid, 2, stride=2)]
            elif scale == 1.0:
                mid, layers = dim, []
            elif scale == 0.5:
                mid, layers = dim, [nn.MaxPool2d(2, stride=2)]
            else:
                raise ValueError(f"scale_factors: unsupported scale {scale} (use 4, 2, 1, 0.5)")
            layers += [
                nn.Conv2d(mid, out_channels, 1, bias=False),
                LayerNorm2d(out_channels, eps=LN_EPS),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels, eps=LN_EPS),
            ]
            stages.append(nn.Sequential(*layers))
            self.names.append(f"p{round(math.log2(patch_stride / scale))}")
        self.stages = nn.ModuleList(stages)
        last = int(self.names[-1][1:])
        self.names.append(f"p{last + 1}")

    @property
    def strides(self) -> list[int]:
        return [2 ** int(name[1:]) for name in self.names]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps = [stage(x) for stage in self.stages]
        maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))
        return dict(zip(self.names, maps))


#: Resize modes of :class:`ViTDetPreprocessing`.
RESIZE_MODES = ("original", "interpolate")


class ViTDetPreprocessing(nn.Module):
    """Resize (short edge to ``short_edge``, long edge at most ``image_size``),
    normalise on 0..255 pixels, pad bottom-right with zeros to a square.

    Two resizes:

    - ``"original"`` (default): the original eventful-transformer release's
      (its VID dataset's ``VIDResize``): scale ``min(short_edge / short side,
      image_size / long side)``, target size ``round(scale * H), round(scale * W)``
      (Python's ``round``), ``torchvision.transforms.functional.resize``
      bilinear with ``antialias=True`` on the image as given, so a uint8 frame
      is resized and rounded back to uint8 before normalisation (a float 0..1
      image is resized in float). Images whose scale is exactly 1 pass through.
    - ``"interpolate"``: detectron2's ``ResizeShortEdge`` target size
      (``int(x + 0.5)``) and ``F.interpolate(mode="bilinear",
      align_corners=False)`` without antialiasing on float pixels.

    Both then normalise with ``mean``/``std`` on 0..255 and pad with zeros
    (after normalisation) at the bottom and right.

    Args:
        image_size: Padded square size S (1024 or 672 in the paper).
        short_edge: Target short edge (640 at 1024, 420 at 672).
        mean: Pixel mean (0..255 scale), per channel.
        std: Pixel std (0..255 scale).
        resize: ``"original"`` or ``"interpolate"`` (see above).

    Shapes: images [(3, H_i, W_i)] (uint8 0..255 or float 0..1) -> ImageList with
    tensors (B, 3, S, S) and image_sizes [(h_i, w_i)] (resized, unpadded).
    """

    def __init__(
        self,
        image_size: int = 1024,
        short_edge: int = 640,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        resize: str = "original",
    ) -> None:
        super().__init__()
        if short_edge > image_size:
            raise ValueError(f"short_edge={short_edge} must not exceed image_size={image_size}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.image_size = image_size
        self.short_edge = short_edge
        self.resize = resize
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def _scale(self, height: int, width: int) -> float:
        if self.resize == "original":
            short, long = min(height, width), max(height, width)
            return min(self.short_edge / short, self.image_size / long)
        scale = self.short_edge / min(height, width)
        if max(height, width) * scale > self.image_size:
            scale = self.image_size / max(height, width)
        return scale

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Output size (h, w) for one image: the original release's rounding
        (``round``) or detectron2's ``ResizeShortestEdge`` (``int(x + 0.5)``)."""
        scale = self._scale(height, width)
        if self.resize == "original":
            return round(scale * height), round(scale * width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def _resized_pixels(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """One image (3, H, W) -> float pixels on 0..255 at ``size``."""
        if self.resize == "original":
            if size != tuple(image.shape[-2:]):
                image = TF.resize(
                    image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True
                )
            # The original scales to [0, 1] (x / 255) and back (x * 255) around its
            # normalisation; the same float operations, for the same values.
            x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            return x * 255.0
        x = image.float() if image.dtype == torch.uint8 else image.float() * 255.0
        if size != tuple(image.shape[-2:]):
            x = F.interpolate(x[None], size, mode="bilinear", align_corners=False)[0]
        return x

    def forward(self, images: Sequence[Tensor] | Tensor) -> ImageList:
        if isinstance(images, Tensor):
            if images.ndim != 4:
                raise ValueError(
                    "expected images (B, 3, H, W) or a list of (3, H, W), "
                    f"got {tuple(images.shape)}"
                )
            images = list(images)
        if not images:
            raise ValueError("expected at least one image")
        batch = images[0].new_zeros(
            (len(images), 3, self.image_size, self.image_size), dtype=torch.float32
        )
        sizes = []
        for i, image in enumerate(images):  # per image of the batch: sizes differ
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected an image (3, H, W), got {tuple(image.shape)}")
            size = self.resized_size(*image.shape[-2:])
            x = self._resized_pixels(image, size)
            batch[i, :, : size[0], : size[1]] = (x - self.mean) / self.std
            sizes.append(size)
        return ImageList(batch, sizes)


class ViTDet(nn.Module):
    """ViTDet: patch embedding, (eventful) ViT backbone, simple feature pyramid,
    Faster R-CNN head.

    Args:
        num_classes: Object classes K (30 for ImageNet VID, 80 for COCO).
        image_size: Padded square input size S (a multiple of ``patch_size``).
        short_edge: Resize target of the short edge (default ``0.625 * S``).
        patch_size: Patch size p.
        dim: Token channels D.
        depth: Backbone blocks.
        heads: Attention heads.
        mlp_ratio: MLP hidden size / D.
        window_size: Window of the windowed blocks.
        window_block_indices: Windowed blocks (the others attend globally).
        position_encoding_size: Grid the absolute position encoding is stored for.
        relative_embedding_size: Grid the global blocks' relative-position
            tables are stored for (windowed blocks store the window size).
        pyramid_channels: Feature pyramid channels.
        box_conv_dims: Box-head convolution channels.
        box_fc_dims: Box-head fully connected features.
        rpn_conv_depth: RPN-head 3 x 3 convolutions (2 in detectron2's ViTDet and
            the original release's VID detector).
        rpn_pre_nms_top_n: RPN proposals per level before NMS, (training, test).
        rpn_post_nms_top_n: RPN proposals per image after NMS, (training, test):
            (1000, 300) as the original release's VID detector; detectron2's
            COCO ViTDet keeps (1000, 1000).
        resize: ``"original"`` (the original release's antialiased resize of
            the uint8 frame, see :class:`ViTDetPreprocessing`) or
            ``"interpolate"`` (float ``F.interpolate``, no antialiasing).
        variant: Backbone variant, a key of :data:`VITDET_VARIANTS`.
        policy: Token-selection policy of the eventful gates.
        matmul_2_cast: ``"float16"``/``"bfloat16"`` ``A @ V`` in global blocks.
        gate_before_ln: Gates before the LayerNorms (ablation).
        drop_path_rate: Backbone stochastic depth.
        mean: Pixel mean (0..255).
        std: Pixel std (0..255).
        dtype: Precision of the patch embedding and the backbone
            (``"float32"``, ``"bfloat16"``, ``"float16"``; inference); the
            feature pyramid and the detection head stay float32.

    Shapes: images (B, 3, H, W) or [(3, H_i, W_i)], uint8 or float 0..1 ->
    eval: [{"boxes" (n, 4) xyxy input pixels, "scores" (n,), "labels" (n,) in 0..K-1}];
    train (with targets): {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
    "loss_box_reg"}.
    """

    def __init__(
        self,
        num_classes: int = 30,
        image_size: int = 1024,
        short_edge: int | None = None,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 14,
        window_block_indices: Sequence[int] = (0, 1, 3, 4, 6, 7, 9, 10),
        position_encoding_size: int = 14,
        relative_embedding_size: int | None = 64,
        pyramid_channels: int = 256,
        box_conv_dims: Sequence[int] = (256, 256, 256, 256),
        box_fc_dims: Sequence[int] = (1024,),
        rpn_conv_depth: int = 2,
        rpn_pre_nms_top_n: Sequence[int] = (2000, 1000),
        rpn_post_nms_top_n: Sequence[int] = (1000, 300),
        resize: str = "original",
        variant: ViTDetVariant = "dense",
        policy: TokenPolicy | None = None,
        matmul_2_cast: str | None = None,
        gate_before_ln: bool = False,
        drop_path_rate: float = 0.0,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if variant not in VITDET_VARIANTS:
            raise ValueError(
                f"unknown variant {variant!r}; choose one of {sorted(VITDET_VARIANTS)}"
            )
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be a multiple of patch_size={patch_size}"
            )
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.num_classes = num_classes
        self.variant = variant
        if short_edge is None:
            short_edge = round(image_size * 0.625)
        self.preprocessing = ViTDetPreprocessing(image_size, short_edge, mean, std, resize)
        self.grid = (image_size // patch_size,) * 2
        self.embedding = PatchEmbedding(3, dim, patch_size)
        self.backbone = ViTBackbone(
            dim=dim,
            depth=depth,
            heads=heads,
            input_size=self.grid,
            mlp_ratio=mlp_ratio,
            position_encoding_size=to_pair(position_encoding_size),
            window_size=window_size,
            window_block_indices=window_block_indices,
            relative_embedding_size=relative_embedding_size,
            matmul_2_cast=matmul_2_cast,
            gate_before_ln=gate_before_ln,
            policy=policy,
            drop_path_rate=drop_path_rate,
            dtype=dtype,
            **VITDET_VARIANTS[variant],
        )
        self.embedding.to(self.backbone.compute_dtype)
        self.pyramid = SimpleFeaturePyramid(dim, pyramid_channels, patch_stride=patch_size)
        self.head = FasterRCNNHead(
            num_classes,
            pyramid_channels,
            strides=self.pyramid.strides,
            box_conv_dims=box_conv_dims,
            box_fc_dims=box_fc_dims,
            rpn_conv_depth=rpn_conv_depth,
            rpn_pre_nms_top_n=rpn_pre_nms_top_n,
            rpn_post_nms_top_n=rpn_post_nms_top_n,
        )

    def reset(self) -> None:
        """Starts new streams: the next frame is a flush for every gate."""
        self.backbone.reset()

    def set_policy(self, policy: TokenPolicy | None) -> None:
        """Sets the token-selection policy of the backbone's gates (e.g. a test-time r)."""
        self.backbone.set_policy(policy)

    def backbone_forward(self, pixels: Tensor) -> Tensor:
        """Normalised, padded pixels (B, 3, S, S) -> backbone tokens (B, h * w, D)
        in the backbone's dtype."""
        return self.backbone(self.embedding(pixels.to(self.backbone.compute_dtype)))

    def features(self, images: ImageList) -> dict[str, Tensor]:
        """Preprocessed images -> feature pyramid {"p2".."p6": (B, C, H_l, W_l)}."""
        tokens = self.backbone_forward(images.tensors).float()
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)
        return self.pyramid(x)

    def forward(
        self,
        images: Sequence[Tensor] | Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("ViTDet in training mode needs targets (boxes and labels per image)")
        original = [tuple(img.shape[-2:]) for img in images]
        image_list = self.preprocessing(images)
        scaled_targets = None
        if targets is not None:
            if len(targets) != len(original):
                raise ValueError(f"got {len(targets)} targets for {len(original)} images")
            scaled_targets = [
                {
                    "boxes": _scale_boxes(t["boxes"].float(), size, resized),
                    "labels": t["labels"].long() + 1,  # torchvision: 0 is background
                }
                for t, size, resized in zip(targets, original, image_list.image_sizes)
            ]
        out = self.head(image_list, self.features(image_list), scaled_targets)
        if self.training:
            return out
        return [
            {
                "boxes": _scale_boxes(d["boxes"], resized, size),
                "scores": d["scores"],
                "labels": d["labels"] - 1,
            }
            for d, size, resized in zip(out, original, image_list.image_sizes)
        ]


def _scale_boxes(boxes: Tensor, source: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """xyxy boxes (n, 4) from an image of size ``source`` (h, w) to ``target``."""
    ratio_h, ratio_w = target[0] / source[0], target[1] / source[1]
    scale = boxes.new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    return boxes * scale


#: ViTDet-B as the published checkpoints define it (detectron2 ``mask_rcnn_vitdet_b``
#: and the original release's VID detector): two RPN convs, a 4-conv (LayerNorm)
#: + 1-fc (1024) box head, and the original release's antialiased uint8 resize.
_VITDET_B: dict[str, Any] = dict(
    drop_path_rate=0.1,
    rpn_conv_depth=2,
    box_conv_dims=(256, 256, 256, 256),
    box_fc_dims=(1024,),
    resize="original",
)

#: Named presets (keyword arguments of :class:`ViTDet`).
VITDET_PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet VID, input padded to 1024 (short edge 640); 300 proposals at test
    # (the original release's VID detector config).
    "vitdet_b_vid": {
        **_VITDET_B,
        "num_classes": 30,
        "image_size": 1024,
        "rpn_post_nms_top_n": (1000, 300),
    },
    # ImageNet VID at 672 (short edge 420): a 42 x 42 token grid.
    "vitdet_b_vid_672": {
        **_VITDET_B,
        "num_classes": 30,
        "image_size": 672,
        "rpn_post_nms_top_n": (1000, 300),
    },
    # COCO (the starting point of VID training), 1024; detectron2's
    # mask_rcnn_vitdet_b keeps 1000 proposals at test.
    "vitdet_b_coco": {
        **_VITDET_B,
        "num_classes": 80,
        "image_size": 1024,
        "rpn_post_nms_top_n": (1000, 1000),
    },
    # A tiny model for tests and demos (2 CPU cores): 128 px, an 8 x 8 grid.
    "vitdet_tiny": {
        "num_classes": 3,
        "image_size": 128,
        "dim": 64,
        "depth": 4,
        "heads": 4,
        "window_size": 4,
        "window_block_indices": (0, 2),
        "position_encoding_size": 4,
        "relative_embedding_size": 8,
        "pyramid_channels": 32,
        "box_conv_dims": (32, 32),
        "box_fc_dims": (64,),
    },
}


def create_vitdet(name: str, **overrides: Any) -> ViTDet:
    """Builds the preset ``name`` (see :data:`VITDET_PRESETS`), with overrides."""
    if name not in VITDET_PRESETS:
        raise ValueError(f"unknown ViTDet preset {name!r}; choose one of {sorted(VITDET_PRESETS)}")
    return ViTDet(**{**VITDET_PRESETS[name], **overrides})
