"""Which tokens each gate updated on each frame: recording and rendering.

:func:`record_token_updates` hooks every :class:`~eventful_pl.gates.TokenGate`
of a model and keeps the index each one selected on each call (None on a
flush frame: every token). :func:`update_maps` turns one stream of those
records into 0/1 maps over the token grid, ``{gate: (frames, H, W)}``,
:func:`render_maps` lays them out as one image (rows: gates, columns: frames),
and :func:`labelled_maps` adds frame numbers, gate names and a colour legend
for TensorBoard. LightningModules expose ``token_update_maps(batch)`` built on
these; :class:`eventful_pl.lightning.callbacks.TokenUpdateMapCallback` logs them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eventful_pl.gates import TokenGate

#: (gate name) -> [(index (B, k) or None for a flush, tokens N of that call)] in call order.
Records = dict[str, list[tuple[Tensor | None, int]]]

#: Colours of :func:`render_maps`: updated tokens, kept tokens, heat (RGB in [0, 1]).
UPDATED_COLOUR = (1.0, 0.9, 0.1)
KEPT_COLOUR = (0.1, 0.1, 0.5)
HEAT_COLOUR = (1.0, 0.15, 0.0)


@contextmanager
def record_token_updates(model: nn.Module, gates: str = "qkv_gate") -> Iterator[Records]:
    """Records the index selected by each token gate of ``model`` on every call.

    Args:
        model: Any module holding token gates.
        gates: Keep only gates whose name ends with this (``""``: every gate).

    Yields ``{gate name: [(index (B, k) int64 on CPU or None, N), ...]}``,
    filled while the block runs; the hooks are removed on exit.
    """
    records: Records = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, TokenGate) and name.endswith(gates):
            records[name] = []

            def hook(_module, inputs, output, name=name):
                index = output[1]
                tokens = inputs[0].shape[1]  # (B, N, D) or heads (B, N, H, d)
                records[name].append((None if index is None else index.detach().cpu(), tokens))

            handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def update_maps(
    records: Mapping[str, list[tuple[Tensor | None, int]]],
    grid: tuple[int, int],
    item: int = 0,
    offset: int = 0,
) -> dict[str, Tensor]:
    """0/1 update maps of batch item ``item``: ``{gate: (frames, H, W) float32}``.

    Args:
        records: From :func:`record_token_updates`.
        grid: Token grid (H, W) of the frame.
        item: Which stream of the batch.
        offset: Tokens before the grid (1 with a class token), left out of the map.
    """
    height, width = grid
    maps = {}
    for name, calls in records.items():
        frames = []
        for index, tokens in calls:
            updated = torch.zeros(tokens)
            if index is None:
                updated.fill_(1.0)
            else:
                updated[index[item]] = 1.0
            frames.append(updated[offset : offset + height * width].view(height, width))
        if frames:
            maps[name] = torch.stack(frames)
    return maps


def heat_overlay(frames: Tensor, heat: Tensor, strength: float = 0.7) -> Tensor:
    """Frames with a red heat map: frames (T, 3, H, W) in [0, 1], heat (T, h, w)
    in [0, 1] over the token grid -> (T, 3, H, W) in [0, 1]."""
    heat = F.interpolate(heat[:, None].float(), size=frames.shape[-2:], mode="nearest")
    red = torch.tensor(HEAT_COLOUR, device=frames.device).view(1, 3, 1, 1)
    weight = strength * heat
    return frames.float() * (1 - weight) + red * weight


def render_maps(
    maps: Mapping[str, Tensor], cell: int = 8, gap: int = 2, frames: Tensor | None = None
) -> Tensor:
    """One image of every map: rows are gates (in order), columns are frames.

    Updated tokens are bright (yellow), kept tokens dark (blue); each token is a
    ``cell`` x ``cell`` square. With ``frames`` (T, 3, H, W) in [0, 1] (the
    frames the maps belong to, the token grid covering each), a first row shows
    each frame with a heat map of the fraction of gates that updated each token.
    Returns (3, H', W') float32 in [0, 1].
    """
    if not maps:
        raise ValueError("render_maps: no maps to render")
    gates = _render_gate_rows(maps, cell, gap)
    if frames is None:
        return gates
    first = next(iter(maps.values()))
    steps, height, width = first.shape
    if len(frames) != steps:
        raise ValueError(f"render_maps: {len(frames)} frames for maps of {steps} frames")
    heat = torch.stack(list(maps.values())).mean(dim=0)  # (T, h, w): share of gates
    size = (height * cell, width * cell)
    shown = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False)
    overlay = F.pad(heat_overlay(shown.clamp(0, 1), heat), (0, gap, 0, gap), value=0.5)
    row = torch.cat(list(overlay), dim=2)  # (3, h * cell + gap, T * (w * cell + gap))
    wide = max(row.shape[2], gates.shape[2])
    row = F.pad(row, (0, wide - row.shape[2]), value=0.5)
    gates = F.pad(gates, (0, wide - gates.shape[2]), value=0.5)
    return torch.cat([row, gates], dim=1)


def _render_gate_rows(maps: Mapping[str, Tensor], cell: int, gap: int) -> Tensor:
    """The gate rows of :func:`render_maps`: (3, H', W')."""
    rows = []
    for frames in maps.values():
        big = F.interpolate(frames[:, None], scale_factor=cell, mode="nearest")[:, 0]
        big = F.pad(big, (0, gap, 0, gap), value=0.5)  # grey separators
        rows.append(torch.cat(list(big), dim=1))
    width = max(row.shape[1] for row in rows)
    image = torch.cat([F.pad(row, (0, width - row.shape[1]), value=0.5) for row in rows], dim=0)
    low = torch.tensor(KEPT_COLOUR)[:, None, None]
    high = torch.tensor(UPDATED_COLOUR)[:, None, None]
    grey = (image == 0.5).float()
    colour = low + (high - low) * image.clamp(0, 1)
    return colour * (1 - grey) + 0.5 * grey


def gate_label(name: str) -> str:
    """A short row label for gate ``name`` (``blocks.3.qkv_gate`` -> ``block 3 qkv``)."""
    label = re.sub(r"(^|\.)blocks\.(\d+)\.", r"\1block \2 ", name)
    return re.sub(r"_gate$", "", label).strip(". ")


def labelled_maps(
    maps: Mapping[str, Tensor],
    cell: int = 8,
    gap: int = 2,
    frames: Tensor | None = None,
    frame_numbers: Sequence[int] | None = None,
    title: str | None = None,
) -> Tensor:
    """:func:`render_maps` with labels: frame numbers over the columns, gate
    names beside the rows, a colour legend (and ``title``) around the maps.

    The maps keep their pixels (no resampling); the labels add margins.
    ``frame_numbers``: one per column (default 0, 1, ...). Returns (3, H'', W'')
    float32 in [0, 1], larger than :func:`render_maps`' image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = render_maps(maps, cell=cell, gap=gap, frames=frames)
    steps, height, width = next(iter(maps.values())).shape
    numbers = list(range(steps)) if frame_numbers is None else [int(n) for n in frame_numbers]
    if len(numbers) != steps:
        raise ValueError(f"labelled_maps: {len(numbers)} frame numbers for {steps} frames")
    rows = (["frame + heat"] if frames is not None else []) + [gate_label(name) for name in maps]
    font, dpi = 8, 100
    char = font * dpi / 72 * 0.62  # a generous glyph width in pixels (DejaVu Sans)
    left = int(max(len(row) for row in rows) * char) + 14
    top = 20 + (16 if title else 0)
    bottom = 26
    right = 10
    image_height, image_width = image.shape[1:]
    fig_width = max(left + image_width + right, 330)
    fig_height = top + image_height + bottom
    fig = Figure(figsize=(fig_width / dpi, fig_height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    axes = fig.add_axes(
        (
            left / fig_width,
            bottom / fig_height,
            image_width / fig_width,
            image_height / fig_height,
        )
    )
    axes.set_xlim(-0.5, image_width - 0.5)
    axes.set_ylim(image_height - 0.5, -0.5)
    column = width * cell + gap
    axes.set_xticks([t * column + width * cell / 2 - 0.5 for t in range(steps)])
    axes.set_xticklabels([f"frame {n}" for n in numbers], fontsize=font)
    axes.xaxis.tick_top()
    row_height = height * cell + gap
    axes.set_yticks([i * row_height + height * cell / 2 - 0.5 for i in range(len(rows))])
    axes.set_yticklabels(rows, fontsize=font)
    axes.tick_params(length=0, pad=2)
    for spine in axes.spines.values():
        spine.set_visible(False)
    legend = [
        Patch(color=UPDATED_COLOUR, label="updated token"),
        Patch(color=KEPT_COLOUR, label="kept token"),
    ]
    if frames is not None:
        legend.append(Patch(color=HEAT_COLOUR, label="heat: share of gates updating"))
    fig.legend(
        handles=legend,
        loc="lower left",
        ncol=len(legend),
        fontsize=font,
        frameon=False,
        borderaxespad=0.2,
        handlelength=1.2,
        columnspacing=1.0,
    )
    if title:
        fig.suptitle(title, fontsize=font + 1, y=1 - 3 / fig_height, va="top")
    canvas.draw()  # labels and legend only: the maps are pasted in below, pixel for pixel
    pixels = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    out = pixels.view(fig_height, fig_width, 4)[..., :3].permute(2, 0, 1).float() / 255.0
    out[:, top : top + image_height, left : left + image_width] = image
    return out
