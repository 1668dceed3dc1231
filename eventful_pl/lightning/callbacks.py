"""Callbacks for eventful models: GFlops per evaluation setting, token-update maps,
prediction files.

Both read what an :class:`~eventful_pl.lightning.evaluation.EventfulEvalModule`
leaves after a validation/test epoch. In a LightningCLI config::

    trainer:
      callbacks:
        - class_path: eventful_pl.lightning.callbacks.GFlopsCallback
        - class_path: eventful_pl.lightning.callbacks.TokenUpdateMapCallback
          init_args: {num_batches: 1}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from eventful_pl.counting import OP_KINDS
from eventful_pl.lightning.annotated_video import AnnotatedVideoWriter, annotate_frames
from eventful_pl.lightning.sweep import sweep_figure
from eventful_pl.lightning.token_maps import labelled_maps


def format_results_table(
    results: dict[str, dict[str, float]], gflops: dict[str, dict[str, float]], unit: str
) -> str:
    """A Markdown table: one row per setting, its metrics and GFlops per ``unit``."""
    metrics = list(dict.fromkeys(key for values in results.values() for key in values))
    header = ["setting", *metrics, f"GFlops/{unit}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in results.items():
        cells = [name] + [f"{values[m]:.4f}" if m in values else "" for m in metrics]
        cells.append(f"{gflops[name]['total']:.3f}" if name in gflops else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class GFlopsCallback(L.Callback):
    """Logs each evaluation setting's GFlops by kind, prints a results table and
    plots accuracy against GFlops.

    The module logs ``{stage}/{setting}/gflops`` itself (``self.log``: in
    Lightning's results table and ``trainer.validate()``'s return value).
    After every validation and test run (not the sanity check) this callback
    logs ``{stage}/{setting}/gflops_{kind}`` to every logger of the trainer,
    keeps one table row per setting (metric values and GFlops per video or
    frame) in :attr:`tables`, and draws the accuracy-vs-GFlops figure
    (:func:`~eventful_pl.lightning.sweep.sweep_figure`): logged to TensorBoard
    as ``{stage}/accuracy_vs_gflops`` and saved, with the table, as
    ``{stage}_accuracy_vs_gflops.png`` / ``.md`` in the logger's ``log_dir``
    (global rank 0; not without a logger). The table is printed after
    ``validate`` and ``test``, and after ``fit`` (its last validation).

    Args:
        by_kind: Also log the GFlops of each operation kind.
        print_table: Print the table (global rank 0 only).
        figure: Draw, log and save the accuracy-vs-GFlops figure.
    """

    def __init__(self, by_kind: bool = True, print_table: bool = True, figure: bool = True) -> None:
        self.by_kind = by_kind
        self.print_table = print_table
        self.figure = figure
        #: ``{stage: table}`` of the latest evaluation of each stage.
        self.tables: dict[str, str] = {}
        #: ``{stage: {setting: {"gflops": ..., metric: ...}}}`` of the latest evaluation.
        self.results: dict[str, dict[str, dict[str, float]]] = {}
        #: ``{stage: folder}`` where the latest table and figure of each stage were saved.
        self.saved: dict[str, Path] = {}

    def _collect(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        stage = getattr(module, "eval_stage", None)
        gflops: dict[str, dict[str, float]] = getattr(module, "eval_gflops", {})
        results: dict[str, dict[str, float]] = getattr(module, "eval_results", {})
        if stage is None or trainer.sanity_checking:
            return
        if self.by_kind:
            metrics = {
                f"{stage}/{name}/gflops_{kind}": values.get(kind, 0.0)
                for name, values in gflops.items()
                for kind in OP_KINDS
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        unit = getattr(getattr(module, "ops_meter", None), "unit", "video")
        self.tables[stage] = format_results_table(results, gflops, unit)
        self.results[stage] = {
            name: {**values, "gflops": gflops.get(name, {}).get("total", float("nan"))}
            for name, values in results.items()
        }
        if self.figure:
            # Every rank: Trainer.log_dir broadcasts rank 0's folder (a collective).
            log_dir = trainer.log_dir if trainer.loggers else None
            if trainer.is_global_zero:
                self._figure(trainer, module, stage, unit, log_dir)

    def _figure(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        stage: str,
        unit: str,
        log_dir: str | None,
    ) -> None:
        """Draws the sweep's figure, logs it to TensorBoard, saves it and the table
        in ``log_dir`` (if any)."""
        figure = sweep_figure(
            getattr(module, "sweep", []),
            module.eval_results,
            module.eval_gflops,
            getattr(module, "main_metric", ""),
            unit,
            own=getattr(module, "own_setting", None),
            title=f"{stage}: {getattr(module, 'main_metric', '')} vs GFlops"
            f" (epoch {trainer.current_epoch})",
        )
        if figure is None:
            return
        if log_dir is not None:
            folder = Path(log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            figure.savefig(folder / f"{stage}_accuracy_vs_gflops.png")
            (folder / f"{stage}_accuracy_vs_gflops.md").write_text(self.tables[stage] + "\n")
            self.saved[stage] = folder
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    f"{stage}/accuracy_vs_gflops", figure, global_step=trainer.global_step
                )

    @rank_zero_only
    def _print(self, stage: str, title: str) -> None:
        if self.print_table and stage in self.tables:
            where = ""
            if stage in self.saved:
                where = f"(table and figure: {self.saved[stage] / f'{stage}_accuracy_vs_gflops'}"
                where += ".md/.png)\n"
            print(f"\n{title}\n{self.tables[stage]}\n{where}", flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, pl_module)
        if trainer.state.fn == "validate":
            self._print("val", "Validation: accuracy vs GFlops")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, pl_module)
        self._print("test", "Test: accuracy vs GFlops")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print("val", f"Validation after epoch {trainer.current_epoch}: accuracy vs GFlops")


class TokenUpdateMapCallback(L.Callback):
    """Logs labelled images of which tokens each gate updated on each frame (TensorBoard).

    On the first ``num_batches`` validation batches of every ``every_n_epochs``-th
    epoch (global rank 0, not the sanity check), asks the module for
    ``token_update_maps(batch) -> {gate: (frames, H, W)}`` (its first stream)
    and logs one image per batch as ``token_updates/batch_{i}``
    (:func:`~eventful_pl.lightning.token_maps.labelled_maps`): one column per
    frame, headed by its frame number (``token_map_frame_numbers(batch)`` of
    the module, if it has one; else 0, 1, ...); a first row with each frame
    under a heat map of the share of gates that updated each token (when the
    module has ``token_map_frames(batch) -> (frames, 3, H, W)``), then one row
    per gate, named on the left, updated tokens bright; a colour legend below.
    Loggers other than TensorBoard are left alone.

    Args:
        num_batches: Validation batches to draw maps for.
        every_n_epochs: Draw them every this many epochs.
        cell: Pixels per token in the image.
    """

    def __init__(self, num_batches: int = 1, every_n_epochs: int = 1, cell: int = 8) -> None:
        if num_batches < 1 or every_n_epochs < 1 or cell < 1:
            raise ValueError(
                "TokenUpdateMapCallback: num_batches, every_n_epochs and cell must be >= 1, got "
                f"{num_batches}, {every_n_epochs}, {cell}"
            )
        self.num_batches = num_batches
        self.every_n_epochs = every_n_epochs
        self.cell = cell
        #: Maps drawn in the latest epoch, ``{batch index: {gate: (frames, H, W)}}``.
        self.maps: dict[int, dict[str, Any]] = {}
        #: The latest image logged, ``{batch index: (3, H, W) float in [0, 1]}``.
        self.images: dict[int, Tensor] = {}

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or batch_idx >= self.num_batches:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        maps = pl_module.token_update_maps(batch)
        if not maps:
            return
        self.maps[batch_idx] = maps
        frames_of = getattr(pl_module, "token_map_frames", None)
        frames = frames_of(batch) if frames_of is not None else None
        numbers_of = getattr(pl_module, "token_map_frame_numbers", None)
        numbers = numbers_of(batch) if numbers_of is not None else None
        image = labelled_maps(
            maps,
            cell=self.cell,
            frames=frames,
            frame_numbers=numbers,
            title=f"tokens updated per gate, epoch {trainer.current_epoch}",
        )
        self.images[batch_idx] = image
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    f"token_updates/batch_{batch_idx}", image, global_step=trainer.global_step
                )


def _jsonable(value: Any) -> Any:
    """Tensors to (nested) lists, recursively through dicts and sequences."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def prediction_items(prediction: Any) -> list[dict[str, Any]]:
    """One dict per item of a ``predict_step`` result: a list of dicts (ViTDet
    segments) as it is, or a dict of per-item values (ViViT ``{"id": [B], ...}``)
    split by item."""
    if isinstance(prediction, dict):
        size = len(next(iter(prediction.values())))
        return [{key: value[i] for key, value in prediction.items()} for i in range(size)]
    return list(prediction)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results as JSON lines to ``output`` (``<stem>.rank<k><suffix>``
    for rank k > 0 under DDP): one line per video (ViViT), segment (ViTDet on
    ImageNet VID) or frame (ViTDet on a
    :class:`~datamodules.video_folder.VideoFolderDataModule`).

    With ``annotate``, ViTDet predictions on a ``VideoFolderDataModule`` are
    also drawn on the frames: boxes with class names and scores, and the
    tokens the backbone recomputed as a translucent red tint, written to
    ``<annotate_dir>/<video stem>.annotated.mp4`` (see
    :mod:`eventful_pl.lightning.annotated_video`). The video has the frames
    the model saw, at the loader's size (the file's, unless the data module
    resizes). Two videos with the same stem get ``-2``, ``-3``, ... suffixes;
    :attr:`annotated` maps each video to its file.

    Args:
        output: The JSON-lines file to write (its folder is created).
        annotate: Write annotated videos of ViTDet predictions.
        annotate_dir: Their folder (default: ``output``'s).
        min_score: Annotated videos show boxes scoring at least this.
        codec: Encoder of the annotated videos (default: libx264, else mpeg4).
    """

    #: Prediction keys kept out of the JSON lines (drawn on annotated videos).
    NOT_WRITTEN = ("token_map", "token_extent")

    def __init__(
        self,
        output: str = "predictions.jsonl",
        annotate: bool = False,
        annotate_dir: str | None = None,
        min_score: float = 0.5,
        codec: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.annotate = annotate
        self.annotate_dir = Path(annotate_dir) if annotate_dir else self.output.parent
        self.min_score = min_score
        self.codec = codec
        #: Annotated video written for each video (its path as the data module gives it).
        self.annotated: dict[str, Path] = {}
        self._files: dict[int, Any] = {}
        self._videos: dict[str, AnnotatedVideoWriter] = {}
        self._warned = False

    def _file(self, rank: int):
        if rank not in self._files:
            path = self.output
            if rank > 0:
                path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[rank] = path.open("w")
        return self._files[rank]

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        handle = self._file(trainer.global_rank)
        items = prediction_items(prediction)
        for item in items:
            kept = {k: v for k, v in item.items() if k not in self.NOT_WRITTEN}
            handle.write(json.dumps(_jsonable(kept)) + "\n")
        if self.annotate:
            self._annotate(batch, items, getattr(trainer.datamodule, "class_names", None))

    def _annotate(self, batch: Any, records: list[dict[str, Any]], names: Any) -> None:
        """Draws the frame records of a batch of video chunks on its frames."""
        if not (isinstance(batch, list) and batch and "chunk" in batch[0]):
            if not self._warned:
                rank_zero_warn(
                    "PredictionWriter: annotate draws ViTDet predictions on a "
                    "VideoFolderDataModule; these predictions are left as JSON only"
                )
                self._warned = True
            return
        done = 0
        for chunk in batch:
            if chunk["frames"] is None:
                continue
            frames = chunk["frames"].cpu()
            mine = records[done : done + len(frames)]
            done += len(frames)
            height, width = frames.shape[-2:]
            size_h, size_w = chunk["size"]
            scale = torch.tensor([width / size_w, height / size_h] * 2)
            detections = [
                {
                    "boxes": torch.as_tensor(r["boxes"]).reshape(-1, 4) * scale,
                    "scores": torch.as_tensor(r["scores"]),
                    "labels": torch.as_tensor(r["labels"]),
                }
                for r in mine
            ]
            maps = torch.stack([torch.as_tensor(r["token_map"]).float() for r in mine])
            drawn = annotate_frames(
                frames, detections, names, maps, mine[0]["token_extent"], self.min_score
            )
            self._video(chunk, (height, width)).write(drawn)
            if chunk["last"]:
                self._videos.pop(chunk["video"]).close()

    def _video(self, chunk: dict[str, Any], size: tuple[int, int]) -> AnnotatedVideoWriter:
        """The open annotated video of ``chunk``'s video (opened on its first chunk)."""
        video = chunk["video"]
        if video not in self._videos:
            taken = set(self.annotated.values())
            stem, number = Path(video).stem, 1
            path = self.annotate_dir / f"{stem}.annotated.mp4"
            while path in taken:
                number += 1
                path = self.annotate_dir / f"{stem}-{number}.annotated.mp4"
            self.annotated[video] = path
            self._videos[video] = AnnotatedVideoWriter(path, chunk["fps"], size, self.codec)
        return self._videos[video]

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for writer in self._videos.values():
            writer.close()
        self._videos.clear()
        for handle in self._files.values():
            handle.close()
        self._files.clear()
