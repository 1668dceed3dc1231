"""Annotated detector videos: boxes, class names and updated tokens drawn on each frame.

:func:`token_heat` places a frame's token-update map (the share of the
backbone's gates that recomputed each token) on the frame's pixels, using the
part of the model's padded square input that the frame fills;
:func:`annotate_frames` tints the recomputed tokens (translucent red, stronger
where more gates recomputed them) and draws the boxes with their class names
and scores; :class:`AnnotatedVideoWriter` encodes the frames with PyAV
(libx264 when present, else mpeg4). :class:`~eventful_pl.lightning.callbacks.PredictionWriter`
with ``annotate: true`` uses these for the ViTDet predictions of a
:class:`~datamodules.video_folder.VideoFolderDataModule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from eventful_pl.lightning.token_maps import heat_overlay

#: Codecs tried in order: H.264 (libx264) plays everywhere; mpeg4 is FFmpeg's own.
CODECS = ("libx264", "mpeg4")


def pick_codec() -> str:
    """The first of :data:`CODECS` that this PyAV build can encode with."""
    for codec in CODECS:
        if codec in av.codecs_available:
            try:
                av.codec.Codec(codec, "w")
            except Exception:  # noqa: BLE001 - listed but without an encoder
                continue
            return codec
    raise RuntimeError(
        f"annotated videos: PyAV has none of the encoders {CODECS}; install a PyAV build "
        "with FFmpeg's libx264 or mpeg4 encoder (the PyPI wheels have both)"
    )


def token_heat(maps: Tensor, extent: tuple[float, float], size: tuple[int, int]) -> Tensor:
    """Token maps over the frames' pixels.

    Args:
        maps: (T, gh, gw) values in [0, 1] over the model's token grid.
        extent: (rows, columns) of the grid, in tokens, that the frame covers
            (the model pads its resized input at the bottom and right).
        size: The frames' (H, W).

    Returns (T, H, W) float32: each pixel the value of the token it falls in.
    """
    rows, columns = extent
    height, width = size
    grid_h, grid_w = maps.shape[-2:]
    big = (max(height, round(height * grid_h / rows)), max(width, round(width * grid_w / columns)))
    heat = F.interpolate(maps[:, None].float(), size=big, mode="nearest")[:, 0]
    return heat[:, :height, :width]


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright colour per class id (the same in every frame and video)."""
    hue = (0.3 + label * 0.6180339887) % 1.0  # class 0 green: not the tint's red
    sector, fraction = int(hue * 6), (hue * 6) % 1.0
    rise, fall = int(255 * fraction), int(255 * (1 - fraction))
    return [
        (255, rise, 0),
        (fall, 255, 0),
        (0, 255, rise),
        (0, fall, 255),
        (rise, 0, 255),
        (255, 0, fall),
    ][sector]


def annotate_frames(
    frames: Tensor,
    detections: Sequence[dict[str, Tensor]],
    names: Sequence[str] | None = None,
    token_maps: Tensor | None = None,
    extent: tuple[float, float] | None = None,
    min_score: float = 0.5,
    strength: float = 0.5,
    line_width: int = 2,
) -> Tensor:
    """Frames with their detections and updated tokens drawn on.

    Args:
        frames: (T, 3, H, W) uint8.
        detections: Per frame ``{"boxes" (n, 4) xyxy in these frames' pixels,
            "scores" (n,), "labels" (n,)}``.
        names: Class names by label (None: the label ids are written).
        token_maps: (T, gh, gw) in [0, 1]: share of gates that recomputed each
            token (None: no tint).
        extent: Grid (rows, columns) the frame covers (see :func:`token_heat`).
        min_score: Boxes scoring below this are not drawn.
        strength: Tint opacity where every gate recomputed the token.
        line_width: Box line width in pixels.

    Returns (T, 3, H, W) uint8.
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"annotate_frames: frames must be (T, 3, H, W) uint8, got {frames.shape}")
    if len(detections) != len(frames):
        raise ValueError(f"annotate_frames: {len(detections)} detections for {len(frames)} frames")
    out = frames
    if token_maps is not None:
        if extent is None:
            extent = tuple(float(s) for s in token_maps.shape[-2:])
        heat = token_heat(token_maps, extent, tuple(frames.shape[-2:]))
        tinted = heat_overlay(frames.float() / 255.0, heat, strength)
        out = (tinted * 255.0).round().clamp(0, 255).to(torch.uint8)
    drawn = []
    for frame, found in zip(out, detections):  # torchvision draws one image at a time
        keep = found["scores"] >= min_score
        boxes, labels, scores = found["boxes"][keep], found["labels"][keep], found["scores"][keep]
        if len(boxes) == 0:
            drawn.append(frame)
            continue
        ids = [int(label) for label in labels]
        texts = [
            f"{names[i] if names is not None and 0 <= i < len(names) else i} {float(s):.2f}"
            for i, s in zip(ids, scores)
        ]
        drawn.append(
            draw_bounding_boxes(
                frame,
                boxes.float(),
                labels=texts,
                colors=[class_colour(i) for i in ids],
                width=line_width,
            )
        )
    return torch.stack(drawn)


class AnnotatedVideoWriter:
    """Writes uint8 frames to a video file with PyAV.

    Even frame sizes are encoded as yuv420p (plays everywhere); odd ones, which
    4:2:0 cannot hold, as yuv444p with libx264 (or yuv420p with mpeg4).

    Args:
        path: The video file (``.mp4``); its folder is created.
        fps: Frames per second.
        size: Frame (H, W).
        codec: An FFmpeg encoder name (default: :func:`pick_codec`).
    """

    def __init__(
        self, path: str | Path, fps: float, size: tuple[int, int], codec: str | None = None
    ) -> None:
        self.path = Path(path)
        self.size = (int(size[0]), int(size[1]))
        self.codec = codec or pick_codec()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rate = Fraction(fps if fps > 0 else 25.0).limit_denominator(1001)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream(self.codec, rate=rate)
        self._stream.height, self._stream.width = self.size
        odd = self.size[0] % 2 or self.size[1] % 2
        self._stream.pix_fmt = "yuv444p" if odd and self.codec == "libx264" else "yuv420p"
        if self.codec == "libx264":
            self._stream.options = {"crf": "18"}  # visually lossless
        else:
            pixels_per_second = self.size[0] * self.size[1] * float(rate)
            self._stream.bit_rate = max(1_000_000, int(0.3 * pixels_per_second))
        #: Frames written so far.
        self.frames = 0

    def write(self, frames: Tensor) -> None:
        """Appends frames (T, 3, H, W) uint8 of the writer's size."""
        if frames.ndim != 4 or tuple(frames.shape[-2:]) != self.size:
            raise ValueError(
                f"AnnotatedVideoWriter({self.path}): frames must be (T, 3, {self.size[0]}, "
                f"{self.size[1]}), got {tuple(frames.shape)}"
            )
        for array in frames.permute(0, 2, 3, 1).contiguous().cpu().numpy():
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> None:
        """Flushes the encoder and closes the file (once)."""
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None
