"""Factorized ViViT ("ViViT Fact. Enc.") with an eventful spatial model (docs/models.md).

A video view (T frames) is cut into tubelets (2 x 16 x 16) by a Conv3d; the
spatial ViT runs once per tubelet time step as one stream (its state is reset
at the start of every view, so views are independent), giving the class-token
output after a final LayerNorm per step; a dense temporal ViT over the steps
(its own class token), dropout and a linear classifier give per-view logits,
averaged over the 3 spatial x 4 temporal views.

The two halves run apart for fine-tuning on cached spatial outputs::

    features = model.spatial_features(video)   # (B, V, T', D), frozen spatial model
    logits = model.classify_features(features)  # (B, classes), temporal + classifier

Shapes: video (B, T, C, H, W), uint8 0..255 or float 0..1 -> logits (B, classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful_pl.backbone import ViTBackbone, resolve_dtype
from eventful_pl.blocks import BlockVariant, to_pair
from eventful_pl.counting import Counted
from eventful_pl.policies import TokenPolicy


class TubeletEmbedding(nn.Module):
    """Linear embedding of (t, h, w) tubelets with a Conv3d (kernel = stride).

    Args:
        in_channels: Image channels.
        dim: Token channels D.
        tubelet: Tubelet size (t, h, w).

    Shapes: (B, T, C, H, W) -> (B, T / t, (H / h) * (W / w), D).
    """

    def __init__(self, in_channels: int, dim: int, tubelet: Sequence[int]) -> None:
        super().__init__()
        self.tubelet = tuple(int(s) for s in tubelet)
        self.conv = nn.Conv3d(in_channels, dim, kernel_size=self.tubelet, stride=self.tubelet)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x.transpose(1, 2).to(self.conv.weight.dtype))  # (B, D, T', h, w)
        return x.flatten(3).permute(0, 2, 3, 1)


class ViViTPreprocessing(nn.Module):
    """Multi-view preprocessing: temporal views, normalisation, resize, spatial crops.

    Videos shorter than ``frames * temporal_stride`` repeat their last frame.
    Temporal views start at evenly spaced frames (one view: the centre); each
    view is scaled to [0, 1] (uint8 input), normalised, resized so it covers
    ``size`` (short edge to the crop size, bilinear with antialiasing) and cut
    into ``spatial_views`` crops evenly spaced along the long edge (one: centre).

    Args:
        frames: Frames per view T.
        size: Crop size (h, w).
        temporal_stride: Frame stride within a view.
        temporal_views: Views along time.
        spatial_views: Crops per temporal view.
        mean: Normalisation mean (one value or one per channel) on [0, 1] pixels.
        std: Normalisation std.

    Shapes: (B, T_video, C, H, W) -> (B, V, T, C, h, w), V = spatial x temporal
    views, spatial-major (view index = spatial * temporal_views + temporal).
    """

    def __init__(
        self,
        frames: int,
        size: int | tuple[int, int],
        temporal_stride: int = 1,
        temporal_views: int = 1,
        spatial_views: int = 1,
        mean: float | Sequence[float] = 0.45,
        std: float | Sequence[float] = 0.225,
    ) -> None:
        super().__init__()
        for name, value in (
            ("frames", frames),
            ("temporal_stride", temporal_stride),
            ("temporal_views", temporal_views),
            ("spatial_views", spatial_views),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.frames = frames
        self.size = to_pair(size)
        self.temporal_stride = temporal_stride
        self.temporal_views = temporal_views
        self.spatial_views = spatial_views
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    @property
    def num_views(self) -> int:
        return self.spatial_views * self.temporal_views

    def temporal_starts(self, length: int) -> list[int]:
        """First frame of each temporal view of a video with ``length`` frames."""
        span = self.frames * self.temporal_stride
        if self.temporal_views == 1:
            return [(length - span) // 2]
        spacing = (length - span) / (self.temporal_views - 1)
        return [int(k * spacing) for k in range(self.temporal_views)]

    def forward(self, video: Tensor) -> Tensor:
        if video.ndim != 5:
            raise ValueError(f"expected a video (B, T, C, H, W), got shape {tuple(video.shape)}")
        b, length, c, _, _ = video.shape
        span = self.frames * self.temporal_stride
        if length < span:
            video = torch.cat([video, video[:, -1:].expand(-1, span - length, -1, -1, -1)], 1)
            length = span
        starts = torch.tensor(self.temporal_starts(length), device=video.device)
        offsets = torch.arange(0, span, self.temporal_stride, device=video.device)
        frames = video[:, (starts[:, None] + offsets).reshape(-1)]  # (B, Vt * T, C, H, W)
        x = frames.float()
        if video.dtype == torch.uint8:
            x = x / 255.0
        x = (x - self.mean) / self.std
        x = self._resize(x.flatten(0, 1))  # (B * Vt * T, C, H', W')
        x = x.view(b, self.temporal_views, self.frames, c, *x.shape[-2:])
        return self._crops(x).flatten(1, 2)

    def _resize(self, x: Tensor) -> Tensor:
        h, w = self.size
        scale = max(h / x.shape[-2], w / x.shape[-1])
        new = (max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale)))
        if new == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)

    def _crops(self, x: Tensor) -> Tensor:
        """(B, Vt, T, C, H', W') -> (B, Vs, Vt, T, C, h, w)."""
        h, w = self.size
        height, width = x.shape[-2:]
        if self.spatial_views == 1:
            corners = [((height - h) // 2, (width - w) // 2)]
        else:
            dh = (height - h) / (self.spatial_views - 1)
            dw = (width - w) / (self.spatial_views - 1)
            corners = [(int(k * dh), int(k * dw)) for k in range(self.spatial_views)]
        return torch.stack([x[..., i : i + h, j : j + w] for i, j in corners], dim=1)


class FactorizedViViT(Counted, nn.Module):
    """Factorized ViViT: eventful-capable spatial ViT per time step, dense temporal ViT.

    Args:
        num_classes: Classifier outputs.
        frames: Frames per view T.
        image_size: Crop size (h, w) per view.
        tubelet: Tubelet size (t, h, w).
        dim: Token channels D.
        spatial_depth: Blocks of the spatial ViT.
        temporal_depth: Blocks of the temporal ViT.
        heads: Attention heads.
        mlp_ratio: MLP hidden size / D.
        spatial_position_size: Grid the spatial position encoding is stored
            for (interpolated to the patch grid); default the patch grid.
        temporal_position_size: Steps the temporal encoding is stored for.
        temporal_stride: Frame stride within a view.
        temporal_views: Views along time.
        spatial_views: Crops per temporal view.
        mean: Pixel normalisation mean on [0, 1] pixels.
        std: Pixel normalisation std.
        dropout: Dropout before the classifier.
        spatial_variant: Block variant of the spatial ViT (``"dense"``,
            ``"tokenwise"``, ``"query_key"``, ``"full"``).
        policy: Token selection policy of the spatial gates.
        spatial_kwargs: More :class:`ViTBackbone` options for the spatial ViT
            (e.g. ``gate_before_ln``, ``stgt``, ``pool_size``).
        drop_path_rate: Stochastic depth of the temporal ViT.
        dtype: Precision of the embedding, both ViTs and the classifier
            (``"float32"``, ``"bfloat16"``, ``"float16"``; inference):
            preprocessing stays float32, spatial features come in ``dtype``,
            logits in float32.

    Shapes: video (B, T_video, C, H, W) -> logits (B, num_classes).
    """

    def __init__(
        self,
        num_classes: int,
        frames: int = 32,
        image_size: int | tuple[int, int] = 224,
        tubelet: Sequence[int] = (2, 16, 16),
        dim: int = 768,
        spatial_depth: int = 12,
        temporal_depth: int = 4,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        spatial_position_size: int | tuple[int, int] | None = None,
        temporal_position_size: int | None = None,
        temporal_stride: int = 2,
        temporal_views: int = 4,
        spatial_views: int = 3,
        mean: float | Sequence[float] = 0.45,
        std: float | Sequence[float] = 0.225,
        dropout: float = 0.0,
        spatial_variant: BlockVariant = "dense",
        policy: TokenPolicy | None = None,
        spatial_kwargs: dict | None = None,
        drop_path_rate: float = 0.0,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        #: The constructor arguments (to build a twin, e.g. a dense one for counting).
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        compute_dtype = resolve_dtype(dtype)
        image_size = to_pair(image_size)
        tubelet = tuple(int(s) for s in tubelet)
        if len(tubelet) != 3:
            raise ValueError(f"tubelet must be (t, h, w), got {tubelet}")
        if frames % tubelet[0] or image_size[0] % tubelet[1] or image_size[1] % tubelet[2]:
            raise ValueError(
                f"tubelet={tubelet} must divide frames={frames} and image_size={image_size}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.dim = dim
        self.steps = frames // tubelet[0]
        grid = (image_size[0] // tubelet[1], image_size[1] // tubelet[2])
        self.preprocessing = ViViTPreprocessing(
            frames, image_size, temporal_stride, temporal_views, spatial_views, mean, std
        )
        self.embedding = TubeletEmbedding(3, dim, tubelet)
        self.spatial = ViTBackbone(
            dim=dim,
            depth=spatial_depth,
            heads=heads,
            input_size=grid,
            mlp_ratio=mlp_ratio,
            position_encoding_size=spatial_position_size,
            class_token=True,
            block_variant=spatial_variant,
            policy=policy,
            final_norm=True,
            **(spatial_kwargs or {}),
        )
        self.temporal = ViTBackbone(
            dim=dim,
            depth=temporal_depth,
            heads=heads,
            input_size=(1, self.steps),
            mlp_ratio=mlp_ratio,
            position_encoding_size=(1, temporal_position_size or self.steps),
            class_token=True,
            final_norm=True,
            drop_path_rate=drop_path_rate,
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)
        if compute_dtype != torch.float32:
            for module in (self.embedding, self.spatial, self.temporal, self.classifier):
                module.to(compute_dtype)

    @property
    def num_views(self) -> int:
        return self.preprocessing.num_views

    def reset(self) -> None:
        """Resets the spatial model's stream state."""
        self.spatial.reset()

    def set_policy(self, policy: TokenPolicy | None) -> None:
        """Sets the token-selection policy of the spatial gates (e.g. a test-time r)."""
        self.spatial.set_policy(policy)

    def spatial_forward(self, views: Tensor) -> Tensor:
        """Preprocessed views (N, T, C, h, w) -> spatial outputs (N, T', D).

        Each of the N views is one stream: state is reset, then the tubelet
        steps run in order.
        """
        tokens = self.embedding(views)  # (N, T', P, D)
        self.spatial.reset()
        steps = [self.spatial(tokens[:, t])[:, 0] for t in range(tokens.shape[1])]
        return torch.stack(steps, dim=1)

    def spatial_features(self, video: Tensor) -> Tensor:
        """Video (B, T_video, C, H, W) -> spatial outputs of every view (B, V, T', D)."""
        views = self.preprocessing(video)
        b, v = views.shape[:2]
        return self.spatial_forward(views.flatten(0, 1)).view(b, v, self.steps, self.dim)

    def temporal_forward(self, features: Tensor) -> Tensor:
        """Spatial outputs (N, T', D) -> per-view logits (N, classes)."""
        x = self.temporal(features)[:, 0]
        x = self.dropout(x)
        self.count("linear", x.numel() * self.num_classes)
        self.count("bias", x.shape[0] * self.num_classes)
        return self.classifier(x).float()

    def classify_features(self, features: Tensor) -> Tensor:
        """Spatial outputs (B, V, T', D) -> logits averaged over views (B, classes)."""
        if features.ndim != 4 or features.shape[2:] != (self.steps, self.dim):
            raise ValueError(
                f"expected spatial features (B, V, {self.steps}, {self.dim}), "
                f"got shape {tuple(features.shape)}"
            )
        b, v = features.shape[:2]
        return self.temporal_forward(features.flatten(0, 1)).view(b, v, -1).mean(dim=1)

    def forward(self, video: Tensor) -> Tensor:
        return self.classify_features(self.spatial_features(video))


#: ViViT-B, 32 frames per view in 16 tubelet steps (the TAdaConv checkpoints).
_VIVIT_B = dict(frames=32, temporal_position_size=16)

#: The keys of :data:`VIVIT_PRESETS` (the command line lists them as choices).
ViViTPreset = Literal["vivit_b_kinetics400", "vivit_b_epic_kitchens", "vivit_tiny"]

#: Named presets (keyword arguments of :class:`FactorizedViViT`).
VIVIT_PRESETS: dict[str, dict] = {
    # Kinetics-400: 224 x 224, temporal stride 2, 400 classes.
    "vivit_b_kinetics400": {
        **_VIVIT_B,
        "num_classes": 400,
        "image_size": 224,
        "temporal_stride": 2,
        "spatial_position_size": 14,
    },
    # EPIC-Kitchens-100 verbs: 320 x 320, stride 1, 97 classes; 20 x 20 position grid.
    "vivit_b_epic_kitchens": {
        **_VIVIT_B,
        "num_classes": 97,
        "image_size": 320,
        "temporal_stride": 1,
        "spatial_position_size": 20,
    },
    # A tiny model for tests and the demo (2 CPU cores).
    "vivit_tiny": {
        "num_classes": 4,
        "frames": 8,
        "image_size": 64,
        "dim": 64,
        "spatial_depth": 2,
        "temporal_depth": 1,
        "heads": 4,
        "temporal_stride": 1,
        "temporal_views": 2,
        "spatial_views": 1,
    },
}


def create_vivit(name: str, **overrides) -> FactorizedViViT:
    """Builds the preset ``name`` (see :data:`VIVIT_PRESETS`), with overrides."""
    if name not in VIVIT_PRESETS:
        raise ValueError(f"unknown ViViT preset {name!r}; choose one of {sorted(VIVIT_PRESETS)}")
    return FactorizedViViT(**{**VIVIT_PRESETS[name], **overrides})
