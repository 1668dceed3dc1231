"""ViTDet on ImageNet VID (+ DET) as a LightningModule: training on independent
images, streaming evaluation of video segments with a test-time r sweep and mAP50.

    python cli.py fit --config configs/vitdet/vid.yaml --config configs/vitdet/vid/672.yaml
    python cli.py validate --config configs/vitdet/vid.yaml --ckpt_path last.ckpt
    python cli.py count --config configs/vitdet/vid.yaml --r 512 1024

Training (docs/training-protocol.md) trains the dense computation: every training image
is its own stream (the model is reset before each forward), so every gate
flushes and the configured variant computes exactly what the dense model
does, with gradients. Evaluation streams each segment frame by frame (state
reset per segment) under each setting of the sweep (``eval_r``,
``eval_thresholds``, or the model's own policy), updates that setting's mAP50
and counts the backbone's operations per frame. Logged:
``train/{loss name}``, ``train/loss``; ``{val,test}/{setting}/map_50``,
``{val,test}/{setting}/mar_100`` and ``{val,test}/{setting}/gflops`` for each
setting (``r512``, ``h0.1``, ``dense``); ``{val,test}/map_50`` and
``hp_metric``: mAP50 of the model's own setting (its ``r`` or ``threshold``,
evaluated even if the sweep leaves it out; without one, the first setting).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim.lr_scheduler import LinearLR, MultiStepLR
from torchmetrics.detection import MeanAveragePrecision

from eventful_pl import counting
from eventful_pl.checkpoints import read_checkpoint
from eventful_pl.gates import TokenGate
from eventful_pl.lightning.evaluation import EventfulEvalModule
from eventful_pl.lightning.sweep import EvalSetting
from eventful_pl.lightning.token_maps import record_token_updates, update_maps
from eventful_pl.models.vitdet import (
    VITDET_PRESETS,
    VITDET_VARIANTS,
    ViTDet,
    ViTDetPreset,
    ViTDetVariant,
    create_vitdet,
)
from eventful_pl.models.vitdet_convert import load_vitdet_checkpoint
from eventful_pl.policies import ThresholdPolicy, TokenPolicy, TopRPolicy
from eventful_pl.weights import resolve_weights

Detections = dict[str, Tensor]

#: Linear warm-up starts at this fraction of the learning rate (detectron2's default).
WARMUP_START_FACTOR = 0.001
#: Frames of the first evaluation segment shown by :meth:`ViTDetModule.token_update_maps`.
MAX_MAP_FRAMES = 8
_PREDICTOR = "head.roi_heads.box_predictor."


class VIDMeanAP(MeanAveragePrecision):
    """mAP at IoU 0.5 (the VID metric): ``compute()`` -> ``{"map_50", "mar_100"}``.

    Labels are the model's 0..K-1; boxes xyxy pixels. ``compute()`` also sets
    ``groundtruth_objects``, the number of ground-truth boxes it saw (over all
    ranks): with none, torchmetrics reports -1.
    """

    def __init__(self) -> None:
        super().__init__(iou_thresholds=[0.5])
        self.groundtruth_objects: int | None = None

    def compute(self) -> dict[str, Tensor]:
        result = super().compute()
        self.groundtruth_objects = sum(int(labels.numel()) for labels in self.groundtruth_labels)
        return {"map_50": result["map_50"], "mar_100": result["mar_100"]}


def _check_options(
    preset: str,
    variant: str,
    model_kwargs: dict[str, Any],
    r: int | None,
    threshold: float | None,
) -> None:
    """Raises ValueError naming the first bad option."""
    if preset not in VITDET_PRESETS:
        raise ValueError(
            f"ViTDetModule: unknown preset {preset!r}; choose one of {sorted(VITDET_PRESETS)}"
        )
    if variant not in VITDET_VARIANTS:
        raise ValueError(
            f"ViTDetModule: unknown variant {variant!r}; choose one of {sorted(VITDET_VARIANTS)}"
        )
    for key in ("variant", "policy"):
        if key in model_kwargs:
            raise ValueError(
                f"ViTDetModule: model_kwargs must not set {key!r}; use the {key!r}"
                f" option{' (r or threshold)' if key == 'policy' else ''}"
            )
    if r is not None and threshold is not None:
        raise ValueError("ViTDetModule: give r or threshold, not both")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ValueError(f"ViTDetModule: r must be a positive integer, got r={r!r}")
    if threshold is not None and float(threshold) < 0:
        raise ValueError(f"ViTDetModule: threshold must be >= 0, got threshold={threshold!r}")


def _own_policy(r: int | None, threshold: float | None) -> TokenPolicy | None:
    if r is not None:
        return TopRPolicy(r)
    if threshold is not None:
        return ThresholdPolicy(float(threshold))
    return None


def has_gates(model: nn.Module) -> bool:
    """Whether ``model`` holds token gates (an eventful variant)."""
    return any(isinstance(m, TokenGate) for m in model.modules())


def predictor_classes(state_dict: dict[str, Tensor]) -> int | None:
    """Object classes K of a checkpoint's box predictor (``cls_score`` has K + 1 rows)."""
    for key, value in state_dict.items():
        if key.endswith("box_predictor.cls_score.weight"):
            return int(value.shape[0]) - 1
    return None


def load_pretrained(model: ViTDet, path: str, trusted: bool = False) -> str:
    """Loads a checkpoint (detectron2, original eventful code, or ours) into ``model``.

    A checkpoint with another number of classes (e.g. COCO's 80 into a
    30-class VID model) loads everything but the box predictor, which keeps
    its fresh initialisation. Returns a short description of what was loaded.
    ``path``: a file or a URL (see :func:`~eventful_pl.weights.resolve_weights`).
    ``trusted``: see :func:`~eventful_pl.checkpoints.read_checkpoint`.
    """
    state_dict = read_checkpoint(resolve_weights(path), trusted)
    classes = predictor_classes(state_dict)
    if classes is None or classes == model.num_classes:
        layout = load_vitdet_checkpoint(model, state_dict)
        return f"{path} ({layout} layout)"
    twin = ViTDet(**{**model.config, "num_classes": classes, "policy": None})
    layout = load_vitdet_checkpoint(twin, state_dict)
    kept = {k: v for k, v in twin.state_dict().items() if not k.startswith(_PREDICTOR)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith(_PREDICTOR) for k in missing):
        raise RuntimeError(f"pretrained: {path} did not fit: {missing} {unexpected}")
    return (
        f"{path} ({layout} layout, {classes} classes): all but the box predictor,"
        f" which starts fresh for {model.num_classes} classes"
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases (1-D) and position encodings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or "position_encoding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class ViTDetModule(EventfulEvalModule):
    """ViTDet (dense training, eventful streaming evaluation) on ImageNet VID.

    Args:
        preset: A key of :data:`~eventful_pl.models.vitdet.VITDET_PRESETS`.
        variant: Backbone variant, a key of :data:`~eventful_pl.models.vitdet.VITDET_VARIANTS`.
        model_kwargs: Overrides of the preset (e.g. ``matmul_2_cast``,
            ``gate_before_ln``, ``num_classes``); not ``variant``/``policy``.
        pretrained: Checkpoint file (detectron2 ``.pkl``/``.pth``, original
            eventful code, or ours); a COCO (80-class) checkpoint loads all but
            the box predictor. A local path or an ``https://`` URL (downloaded
            once, optional ``#sha256=...``: :mod:`eventful_pl.weights`). Read
            at the start of fit/validate/test/predict (not when a Lightning
            checkpoint is restored) or by :meth:`load_pretrained`, not at
            construction.
        trust_pretrained: Read ``pretrained`` with plain pickle, which runs any
            code the file names. Off by default: only tensors, numpy arrays and
            plain containers are read, and a file that needs more is refused.
        r: The model's own policy: top-r tokens per frame.
        threshold: The model's own policy instead: update tokens whose error
            norm exceeds this.
        eval_r: Test-time r values swept in validation and test.
        eval_thresholds: Test-time thresholds swept in validation and test.
        eval_dense: Also evaluate the dense model (setting ``dense``, last): the
            gates forward every token, which computes exactly the network
            without gates (for ``spatiotemporal``: ``spatial``, keeping the
            pooling), and the GFlops are that backbone's.
        eval_budgets: Compute budgets to sweep (settings ``b<budget>``, GFlops
            per frame): the calibrated per-gate thresholds filed under each
            budget in ``calibration``.
        calibration: The calibration file of ``eval_budgets``, written by
            ``python cli.py calibrate``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (not on norms, biases, position encoding).
        warmup_steps: Linear warm-up over this many optimizer steps (from
            0.001 x ``lr``).
        decay_epochs: Epochs (0-based ``trainer.current_epoch``) from which
            the learning rate is multiplied by another 0.1.
        count_ops: Count the backbone's operations during evaluation (GFlops
            per frame per setting, in ``eval_gflops``).
    """

    main_metric = "map_50"

    def __init__(
        self,
        preset: ViTDetPreset = "vitdet_b_vid",
        variant: ViTDetVariant = "eventful",
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        trust_pretrained: bool = False,
        r: int | None = None,
        threshold: float | None = None,
        eval_r: list[int] | None = None,
        eval_thresholds: list[float] | None = None,
        eval_dense: bool = False,
        eval_budgets: list[float] | None = None,
        calibration: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        warmup_steps: int = 250,
        decay_epochs: Sequence[int] = (3,),
        count_ops: bool = True,
    ) -> None:
        model_kwargs = dict(model_kwargs or {})
        _check_options(preset, variant, model_kwargs, r, threshold)
        for name, value, ok in (
            ("lr", lr, lr > 0),
            ("weight_decay", weight_decay, weight_decay >= 0),
            ("warmup_steps", warmup_steps, warmup_steps >= 0),
            ("decay_epochs", decay_epochs, all(int(e) >= 0 for e in decay_epochs)),
        ):
            if not ok:
                raise ValueError(f"ViTDetModule: invalid {name}: {value!r}")
        super().__init__(
            eval_r,
            eval_thresholds,
            unit="frame",
            default_setting="default",
            eval_dense=eval_dense,
            eval_budgets=eval_budgets,
            calibration=calibration,
            own_r=r,
            own_threshold=threshold,
        )
        self.save_hyperparameters()
        self.policy = _own_policy(r, threshold)
        self.model = create_vitdet(preset, variant=variant, policy=self.policy, **model_kwargs)
        self._check_sweep(variant)
        self.pretrained, self.trust_pretrained = pretrained, trust_pretrained
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps = warmup_steps
        self.decay_epochs = sorted(int(e) for e in decay_epochs)
        self.count_ops = count_ops
        self._dense_counts: dict[str, int] | None = None
        self.build_eval_metrics()

    def _check_sweep(self, variant: str) -> None:
        """Every setting's policy must fit the token grid; eventful models need one."""
        tokens = self.model.backbone.num_tokens
        policies = [TopRPolicy(tokens) if s.dense else s.policy() for s in self.sweep]
        if not has_gates(self.model):
            if self.policy is not None or any(p is not None for p in policies):
                raise ValueError(
                    f"ViTDetModule: variant {variant!r} has no token gates; r, threshold,"
                    " eval_r, eval_thresholds and eval_dense need an eventful variant"
                )
            return
        for policy in policies:
            if policy is not None:
                policy.validate(tokens)
        if self.policy is None and any(p is None for p in policies):
            raise ValueError(
                f"ViTDetModule: variant {variant!r} needs a policy: set r or threshold"
                " (or eval_r / eval_thresholds)"
            )

    def read_pretrained(self) -> None:
        """Loads ``pretrained`` into the network (see :meth:`load_pretrained`)."""
        if self.pretrained:
            loaded = load_pretrained(self.model, self.pretrained, self.trust_pretrained)
            rank_zero_info(f"ViTDetModule: loaded {loaded}")

    # ----------------------------------------------------------------- training

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> Tensor:
        """``batch``: (list of uint8 (3, H_i, W_i), list of {"boxes" (n_i, 4), "labels" (n_i,)})."""
        images, targets = batch
        self.model.reset()  # every image is its own stream: a flush frame (dense computation)
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.check_finite_loss(loss, [t.get("image_id", "?") for t in targets])
        batch_size = len(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.model.reset()  # drop the training frame's stream state

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        """AdamW; linear warm-up per step, then x0.1 from each decay epoch.

        Both schedulers are chainable (each multiplies the current rate), so
        the rate at step s in epoch e is ``lr * warmup(s) * 0.1 ** (decays <= e)``.
        """
        optimizer = torch.optim.AdamW(param_groups(self.model, self.weight_decay), lr=self.lr)
        schedulers = []
        if self.warmup_steps > 0:
            warmup = LinearLR(optimizer, WARMUP_START_FACTOR, 1.0, total_iters=self.warmup_steps)
            schedulers.append({"scheduler": warmup, "interval": "step", "name": "lr-warmup"})
        if self.decay_epochs:
            decay = MultiStepLR(optimizer, milestones=self.decay_epochs, gamma=0.1)
            schedulers.append({"scheduler": decay, "interval": "epoch", "name": "lr-decay"})
        return [optimizer], schedulers

    # ----------------------------------------------------------------- evaluation

    def make_metrics(self) -> VIDMeanAP:
        return VIDMeanAP()

    def _end_eval(self, stage: str) -> None:
        """Logs the metrics; warns for each setting whose mAP had no ground truth."""
        super()._end_eval(stage)
        empty = [s.name for s in self.sweep if self.metrics(stage, s).groundtruth_objects == 0]
        if empty:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
            split = getattr(datamodule, "val_split", None)
            rank_zero_warn(
                f"ViTDetModule {stage}"
                + (f" (split {split!r})" if split else "")
                + f": no ground-truth objects in the evaluated frames, so {stage}/map_50 of "
                f"setting(s) {empty} is undefined (logged as -1); check the annotations"
            )

    def setting_policy(self, setting: EvalSetting) -> TokenPolicy | None:
        """The policy of ``setting`` (every token for dense; the model's own when
        the setting has none)."""
        if setting.dense:
            return TopRPolicy(self.model.backbone.num_tokens)
        policy = setting.policy()
        return self.policy if policy is None else policy

    def dense_frame_counts(self) -> dict[str, int]:
        """Backbone operations per frame of the same network without gates (a
        shapes-only twin; with the variant's key/value pooling, if any)."""
        if self._dense_counts is None:
            pooled = VITDET_VARIANTS[self.model.variant].get("pool_size") is not None
            variant = "spatial" if pooled else "dense"
            with torch.device("meta"):
                dense = ViTDet(**{**self.model.config, "variant": variant, "policy": None})
                height, width = dense.backbone.input_size
                tokens = torch.empty(1, height * width, dense.backbone.dim)
                with counting.count_ops(dense.backbone) as counter:
                    dense.backbone(tokens)
            self._dense_counts = dict(counter.counts)
        return self._dense_counts

    @torch.no_grad()
    def stream(self, frames: Sequence[Tensor], setting: EvalSetting) -> list[Detections]:
        """Detections of one stream under ``setting``, frame by frame (state reset first).

        ``frames``: uint8 (3, H, W) in order -> per frame {"boxes" (n, 4) xyxy
        pixels, "scores" (n,), "labels" (n,) in 0..K-1}. With ``count_ops`` the
        backbone's operations are added to ``ops_meter`` (one unit per frame).
        """
        if has_gates(self.model.backbone):
            self.model.set_policy(self.setting_policy(setting))
        self.model.reset()
        detections = []
        for frame in frames:  # one stream: each frame depends on the state of the last
            if self.count_ops:
                with counting.count_ops(self.model.backbone) as counter:
                    detections.append(self.model([frame])[0])
                counts = self.dense_frame_counts() if setting.dense else counter.counts
                self.ops_meter.add(setting.name, counts, 1)
            else:
                detections.append(self.model([frame])[0])
        self.model.reset()
        return detections

    def eval_step(self, batch: list[dict[str, Any]]) -> None:
        """Streams every segment of ``batch`` under every setting and updates its mAP.

        ``batch``: segment items {"frames": [uint8 (3, H, W)], "targets": [...]},
        each one stream.
        """
        stage = self.stage_of(self.trainer.state.stage)
        try:
            for segment in batch:
                targets = [
                    {"boxes": t["boxes"].float(), "labels": t["labels"].long()}
                    for t in segment["targets"]
                ]
                for setting in self.sweep:
                    preds = self.stream(segment["frames"], setting)
                    self.metrics(stage, setting).update(preds, targets)
        finally:
            self._restore_policy()

    def _restore_policy(self) -> None:
        if has_gates(self.model.backbone):
            self.model.set_policy(self.policy)
        self.model.reset()

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self.eval_step(batch)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self.eval_step(batch)

    def setup(self, stage: str) -> None:
        """The base checks; for ``predict`` on a
        :class:`~datamodules.video_folder.VideoFolderDataModule`, tells it to serve
        frames in order and checks its class list."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        hand_over = getattr(datamodule, "use_vitdet_frames", None)
        if stage == "predict" and hand_over is not None:
            hand_over(num_classes=self.model.num_classes)

    @torch.no_grad()
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Streams each segment under the model's own policy -> per segment
        ``{"video_id", "segment_index", "frame_indices", "detections": [per frame
        {"boxes" (n, 4) xyxy pixels, "scores" (n,), "labels" (n,)}]}``.

        A batch of video chunks (:class:`~datamodules.video_folder.VideoFolderDataModule`)
        gives one record per frame instead, see :meth:`predict_chunks`.
        """
        if batch and "chunk" in batch[0]:
            return self.predict_chunks(batch)
        own = EvalSetting("predict")
        count, self.count_ops = self.count_ops, False
        try:
            return [
                {
                    "video_id": segment["video_id"],
                    "segment_index": segment["segment_index"],
                    "frame_indices": segment["frame_indices"],
                    "detections": self.stream(segment["frames"], own),
                }
                for segment in batch
            ]
        finally:
            self.count_ops = count
            self._restore_policy()

    @torch.no_grad()
    def predict_chunks(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Video chunks in order -> one record per frame, under the model's own policy.

        ``batch``: chunk items of :class:`~datamodules.video_folder.FrameChunkDataset`.
        The stream goes on from the previous chunk of the same video (also
        across batches) unless the chunk starts a stream (``reset``) or does
        not follow the last one streamed. Records: ``{"video", "frame" (number
        in the file), "boxes" (n, 4) xyxy in the video's pixels, "scores",
        "labels", "names" (None without a class list), "gflops" (the
        backbone's, this frame), "updated" (share of tokens recomputed),
        "token_map" (gh, gw) float16 share of gates that recomputed each token,
        "token_extent" (rows, columns of the grid the frame covers)}``; a chunk
        that failed to decode gives no records.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        names = getattr(datamodule, "class_names", None)
        device = next(self.model.parameters()).device
        if has_gates(self.model.backbone):
            self.model.set_policy(self.setting_policy(EvalSetting("predict")))
        pre = self.model.preprocessing
        records: list[dict[str, Any]] = []
        for item in batch:
            position = (item["video"], item["chunk"])
            follows = getattr(self, "_predict_position", None) == (item["video"], item["chunk"] - 1)
            if item["frames"] is None:
                self._predict_position = None
                continue
            if item["reset"] or not follows:
                self.model.reset()
            self._predict_position = position
            frames = item["frames"]
            height, width = frames.shape[-2:]
            size_h, size_w = item["size"]
            scale = torch.tensor([size_w / width, size_h / height] * 2)
            resized = pre.resized_size(height, width)
            grid_h, grid_w = self.model.grid
            extent = (resized[0] * grid_h / pre.image_size, resized[1] * grid_w / pre.image_size)
            found, gflops = [], []
            with record_token_updates(self.model.backbone) as calls:
                for frame in frames:  # one stream: each frame depends on the state of the last
                    with counting.count_ops(self.model.backbone) as counter:
                        found.append(self.model([frame.to(device)])[0])
                    gflops.append(sum(counter.counts.values()) / 1e9)
            maps = update_maps(calls, self.model.grid)
            if maps:
                shares = torch.stack(list(maps.values())).mean(dim=0)  # (T, gh, gw)
            else:  # no gates: every token is computed
                shares = torch.ones(len(frames), grid_h, grid_w)
            for k, detections in enumerate(found):
                labels = detections["labels"].cpu()
                records.append(
                    {
                        "video": item["video"],
                        "frame": int(item["frame_indices"][k]),
                        "boxes": detections["boxes"].cpu() * scale,
                        "scores": detections["scores"].cpu(),
                        "labels": labels,
                        "names": None if names is None else [names[int(i)] for i in labels],
                        "gflops": gflops[k],
                        "updated": float(shares[k].mean()),
                        "token_map": shares[k].to(torch.float16),
                        "token_extent": extent,
                    }
                )
        return records

    def token_map_frame_numbers(self, batch: list[dict[str, Any]]) -> list[int] | None:
        """The video frame numbers of the frames :meth:`token_update_maps`
        shows (the labels of its columns), if the segment has them."""
        if not batch or not batch[0]["frames"] or "frame_indices" not in batch[0]:
            return None
        count = len(batch[0]["frames"][:MAX_MAP_FRAMES])
        return [int(i) for i in list(batch[0]["frame_indices"])[:count]]

    @torch.no_grad()
    def token_map_frames(self, batch: list[dict[str, Any]]) -> Tensor | None:
        """The frames :meth:`token_update_maps` shows, resized and padded as the
        backbone sees them: (frames, 3, S, S) in [0, 1]."""
        if not batch or not batch[0]["frames"]:
            return None
        frames = batch[0]["frames"][:MAX_MAP_FRAMES]
        pre = self.model.preprocessing
        pixels = pre(list(frames)).tensors  # normalised, padded with zeros
        return ((pixels * pre.std + pre.mean) / 255.0).clamp(0, 1)

    @torch.no_grad()
    def token_update_maps(self, batch: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Tokens updated per frame of the batch's first segment (at most 8 frames),
        under the model's own policy (else the first setting of the sweep):
        ``{gate: (frames, H, W)}`` of 0/1."""
        if not batch or not batch[0]["frames"]:
            return {}
        frames = batch[0]["frames"][:MAX_MAP_FRAMES]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            if has_gates(self.model.backbone):
                self.model.set_policy(self.policy or self.setting_policy(self.sweep[0]))
            self.model.reset()
            with record_token_updates(self.model.backbone) as records:
                for frame in frames:
                    self.model([frame.to(device)])
            return update_maps(records, self.model.grid)
        finally:
            self._restore_policy()
            self.model.train(was_training)
