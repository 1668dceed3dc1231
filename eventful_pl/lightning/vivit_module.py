"""ViViT temporal fine-tuning on a frozen eventful spatial model (docs/training-protocol.md).

The spatial half of a :class:`~eventful_pl.models.vivit.FactorizedViViT` is
eventful (top-r, r fixed for the run) and frozen; the dense temporal model and
the classifier train on its outputs, with dropout before the classifier and
AdamW. Training batches are either cached spatial features
(``(features (B, V, T', D), labels (B,))``, see :mod:`datamodules.features`) or
whole videos (``{"video" (B, T, 3, H, W) uint8, "length", "label"}``, the
spatial model runs on the fly); both give the same result. Validation and test
run whole videos through the model under every setting of the sweep
(``eval_r`` / ``eval_thresholds``) and report top-1 / top-5 accuracy and
GFlops per video for each::

    python cli.py fit --config configs/vivit/epic_kitchens.yaml
    python cli.py test --config configs/vivit/epic_kitchens.yaml --ckpt_path last.ckpt
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from eventful_pl.blocks import BlockVariant
from eventful_pl.counting import count_ops
from eventful_pl.gates import TokenGate
from eventful_pl.lightning.evaluation import EventfulEvalModule
from eventful_pl.lightning.feature_cache import check_feature_datamodule, prepare_finetune_cache
from eventful_pl.lightning.sweep import EvalSetting
from eventful_pl.lightning.token_maps import record_token_updates, update_maps
from eventful_pl.models.gflops import static_video_counts
from eventful_pl.models.vivit import VIVIT_PRESETS, FactorizedViViT, ViViTPreset, create_vivit
from eventful_pl.models.vivit_convert import load_vivit_checkpoint
from eventful_pl.policies import TopRPolicy

Batch = Mapping[str, Any] | Sequence[Tensor]


def batch_ids(batch: Batch) -> list[Any] | None:
    """The item ids of a video batch (``"id"``) or a feature batch (third element)."""
    if isinstance(batch, Mapping):
        return list(batch.get("id", [])) or None
    return list(batch[2]) if len(batch) > 2 else None


class ViViTFineTuning(EventfulEvalModule):
    """Fine-tunes the temporal model + classifier of a ViViT on a frozen eventful spatial model.

    Args:
        preset: ViViT preset (a key of ``VIVIT_PRESETS``).
        model_kwargs: Overrides of the preset (e.g. ``num_classes``, ``frames``).
        pretrained: Checkpoint to start from (TAdaConv ViViT Fact. Enc., the
            original eventful-transformer layout, or ours); None: random weights.
            A local path or an ``https://`` URL (downloaded once, optional
            ``#sha256=...``: :mod:`eventful_pl.weights`).
            Read at the start of fit/validate/test/predict (not when a Lightning
            checkpoint is restored) or by :meth:`load_pretrained`, not here.
        trust_pretrained: Read ``pretrained`` with plain pickle, which runs any
            code the file names. Off by default: only tensors, numpy arrays and
            plain containers are read, and a file that needs more is refused.
        r: Tokens per frame of the frozen eventful spatial model during training
            (and the model's own evaluation setting).
        spatial_variant: Spatial block variant (``"full"``: the method;
            ``"tokenwise"``, ``"query_key"``; ``"dense"``: no gates, r unused).
        eval_r: Test-time r values swept in validation and test.
        eval_thresholds: Test-time thresholds swept in validation and test.
        eval_dense: Also evaluate the dense model (setting ``dense``, last): the
            spatial gates forward every token, which computes exactly the dense
            model, and the GFlops are the dense model's.
        eval_budgets: Compute budgets to sweep (settings ``b<budget>``, GFlops
            per video): the calibrated per-gate thresholds filed under each
            budget in ``calibration``.
        calibration: The calibration file of ``eval_budgets``, written by
            ``python cli.py calibrate``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        dropout: Dropout before the classifier.
        count_ops: Count operations during evaluation (GFlops per video).

    Logged: ``train/loss``, ``train/top1``; ``{val,test}/{setting}/{top1,top5,gflops}``
    for each setting (``r16``, ``h0.1``, ``dense``); ``{val,test}/top1`` and
    ``hp_metric``: top-1 of the run's own setting (``r{r}``, evaluated even if
    ``eval_r`` leaves it out); GFlops by kind, the results table and the
    accuracy-vs-GFlops figure through
    :class:`~eventful_pl.lightning.callbacks.GFlopsCallback`.
    """

    main_metric = "top1"

    def __init__(
        self,
        preset: ViViTPreset = "vivit_b_kinetics400",
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        trust_pretrained: bool = False,
        r: int | None = 24,
        spatial_variant: BlockVariant = "full",
        eval_r: list[int] | None = None,
        eval_thresholds: list[float] | None = None,
        eval_dense: bool = False,
        eval_budgets: list[float] | None = None,
        calibration: str | None = None,
        lr: float = 2e-6,
        weight_decay: float = 0.05,
        dropout: float = 0.5,
        count_ops: bool = True,
    ) -> None:
        if preset not in VIVIT_PRESETS:
            raise ValueError(
                f"preset: unknown ViViT preset {preset!r}; choose one of {sorted(VIVIT_PRESETS)}"
            )
        eventful = spatial_variant != "dense"
        if eventful and (r is None or r <= 0):
            raise ValueError(f"r: an eventful spatial model needs r > 0, got {r}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        if (eval_r or eval_thresholds or eval_dense or eval_budgets) and not eventful:
            raise ValueError(
                "eval_r/eval_thresholds/eval_dense/eval_budgets need an eventful "
                "spatial_variant, not 'dense'"
            )
        super().__init__(
            eval_r,
            eval_thresholds,
            unit="video",
            default_setting="dense",
            own_r=int(r) if eventful else None,
            eval_dense=eval_dense,
            eval_budgets=eval_budgets,
            calibration=calibration,
        )
        self.save_hyperparameters()
        self.r = int(r) if eventful else None
        self.lr, self.weight_decay, self.count_ops = lr, weight_decay, count_ops
        self.model: FactorizedViViT = create_vivit(
            preset,
            **{
                **(model_kwargs or {}),
                "spatial_variant": spatial_variant,
                "policy": TopRPolicy(self.r) if self.r else None,
                "dropout": dropout,
            },
        )
        tokens = self.model.spatial.num_tokens
        for option, values in (("r", [self.r] if self.r else []), ("eval_r", eval_r or [])):
            if any(int(v) > tokens for v in values):
                raise ValueError(
                    f"{option}={values} exceeds the spatial model's {tokens} tokens per frame"
                )
        self.pretrained, self.trust_pretrained = pretrained, trust_pretrained
        for part in (self.model.embedding, self.model.spatial):
            part.requires_grad_(False)
        self.train_top1 = MulticlassAccuracy(self.model.num_classes, average="micro")
        self._static_cache: dict[str, dict[str, int]] = {}
        self._checked_caches: set = set()
        self.build_eval_metrics()
        self.train()  # the frozen parts in eval mode from the start (model summary)

    def read_pretrained(self) -> None:
        """Loads ``pretrained`` into the network (see :meth:`load_pretrained`)."""
        if self.pretrained:
            layout = load_vivit_checkpoint(self.model, self.pretrained, self.trust_pretrained)
            rank_zero_info(f"ViViTFineTuning: loaded {self.pretrained} ({layout} layout)")
        else:
            rank_zero_info(
                "ViViTFineTuning: pretrained is not set, so the frozen spatial model keeps "
                "its random initialisation (fine for the demo; set model.pretrained for real runs)"
            )

    def on_fit_start(self) -> None:
        """Pretrained weights, then the training feature cache: written on first
        use by this model (each rank its shard, then a barrier) and checked
        against it (:func:`~eventful_pl.lightning.feature_cache.prepare_finetune_cache`)."""
        super().on_fit_start()
        prepare_finetune_cache(self.trainer, self.model, self.r)
        self._check_feature_caches()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._check_feature_caches()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._check_feature_caches()

    def _check_feature_caches(self) -> None:
        """Refuses the caches of a FeatureDataModule that another model made."""
        check_feature_datamodule(self._trainer, self.model, self._checked_caches)

    # ------------------------------------------------------------------- model

    def make_metrics(self) -> MetricCollection:
        classes = self.model.num_classes
        return MetricCollection(
            {
                "top1": MulticlassAccuracy(classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(classes, top_k=min(5, classes), average="micro"),
            }
        )

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen embedding and spatial model: always in eval mode (only the
        temporal model and classifier train)."""
        return [self.model.embedding, self.model.spatial]

    def video_features(self, batch: Mapping[str, Any]) -> Tensor:
        """Spatial features of whole videos: batch ``video`` (B, T, 3, H, W) -> (B, V, T', D).

        Items shorter than the batch (``length``) are run at their own length,
        and ``video`` may be a list of B (T_i, 3, H_i, W_i) clips of different
        frame sizes (:func:`datamodules.video.collate_eval`): one spatial pass
        per distinct clip shape, the rows put back in the batch's order.
        """
        video = batch["video"]
        lengths = batch.get("length")
        if isinstance(video, Tensor):
            if lengths is None or bool((lengths == video.shape[1]).all()):
                return self.model.spatial_features(video)
            video = [clip[:length] for clip, length in zip(video, lengths.tolist())]
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, clip in enumerate(video):
            groups.setdefault(tuple(clip.shape), []).append(row)
        out = None
        for rows in groups.values():
            features = self.model.spatial_features(torch.stack([video[row] for row in rows]))
            if out is None:
                out = features.new_empty(len(video), *features.shape[1:])
            out[rows] = features
        return out

    def features_and_labels(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(features (B, V, T', D), labels (B,)) of a feature or video batch."""
        if isinstance(batch, Mapping):
            with torch.no_grad():
                return self.video_features(batch), batch["label"]
        features, labels = batch[0], batch[1]
        return features, labels

    # ---------------------------------------------------------------- training

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        features, labels = self.features_and_labels(batch)
        logits = self.model.classify_features(features)
        loss = F.cross_entropy(logits, labels)
        self.check_finite_loss(loss, batch_ids(batch))
        self.train_top1(logits, labels)
        size = len(labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # -------------------------------------------------------------- evaluation

    def set_setting(self, setting: EvalSetting) -> None:
        """Sets the spatial policy of ``setting`` (its own, every token for dense,
        or the run's top-r)."""
        policy = setting.policy()
        if setting.dense:
            policy = TopRPolicy(self.model.spatial.num_tokens)
        self.model.set_policy(policy or (TopRPolicy(self.r) if self.r else None))

    def eval_step(self, batch: Batch, stage: str) -> None:
        """Every setting of the sweep on one batch: metrics and operation counts."""
        try:
            for setting in self.sweep:
                self.set_setting(setting)
                if isinstance(batch, Mapping):
                    labels = batch["label"]
                    with count_ops(self.model) as counter:
                        logits = self.model.classify_features(self.video_features(batch))
                    counts = counter.counts
                    if setting.dense:  # the dense model's operations, not the gates'
                        counts = {k: n * len(labels) for k, n in self._dense_counts().items()}
                else:
                    features, labels = batch[0], batch[1]
                    if len(self.sweep) > 1 or setting.threshold is not None or setting.budget:
                        raise ValueError(
                            "eval_r/eval_thresholds/eval_budgets sweeps need video batches (the "
                            "spatial model runs per setting); cached features hold one r"
                        )
                    logits = self.model.classify_features(features)
                    counts = {kind: n * len(labels) for kind, n in self._static_counts().items()}
                self.metrics(stage, setting).update(logits, labels)
                if self.count_ops:
                    self.ops_meter.add(setting.name, counts, len(labels))
        finally:
            self.set_setting(EvalSetting("own"))  # back to the run's top-r

    def _dense_counts(self) -> dict[str, int]:
        """Operations per video of the dense model (a shapes-only twin)."""
        if "dense" not in self._static_cache:
            with torch.device("meta"):
                dense = FactorizedViViT(
                    **{**self.model.config, "spatial_variant": "dense", "policy": None}
                )
            self._static_cache["dense"] = static_video_counts(dense)
        return self._static_cache["dense"]

    def _static_counts(self) -> dict[str, int]:
        """Operations per video of the current (static) policy: what computing
        cached features costs; measured once per policy."""
        gates = (m for m in self.model.spatial.modules() if isinstance(m, TokenGate))
        key = repr(next((gate.policy for gate in gates), None))
        if key not in self._static_cache:
            self._static_cache[key] = static_video_counts(self.model)
        return self._static_cache[key]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def setup(self, stage: str) -> None:
        """The base checks; for ``predict`` on a
        :class:`~datamodules.video_folder.VideoFolderDataModule`, hands it the model's
        view settings and checks its class list."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        hand_over = getattr(datamodule, "use_vivit_clips", None)
        if stage == "predict" and hand_over is not None:
            pre = self.model.preprocessing
            hand_over(
                frames=pre.frames,
                temporal_stride=pre.temporal_stride,
                temporal_views=pre.temporal_views,
                short_side=max(pre.size),
                num_classes=self.model.num_classes,
            )

    @torch.no_grad()
    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Whole videos under the run's top-r -> per video (lists of B):
        ``{"id", "logits" (B, classes), "label" (B,) predicted class, "top5": [B
        lists of {"class", "name", "score" (softmax)}], "gflops" [B]}``;
        ``"video"`` (the file) too for a batch of
        :class:`~datamodules.video_folder.VideoFolderDataModule`. ``name`` is
        None unless the data module has ``class_names``. With ``count_ops``
        each video's operations are counted on its own (else ``gflops`` is None).
        """
        self.set_setting(EvalSetting("own"))
        video, lengths = batch["video"], batch.get("length")
        clips = [
            video[i] if lengths is None else video[i][: int(lengths[i])] for i in range(len(video))
        ]
        logits, gflops = [], []
        for clip in clips:  # per video: its own operation count and frame size
            if not self.count_ops:
                logits.append(self.model.classify_features(self.model.spatial_features(clip[None])))
                gflops.append(None)
                continue
            with count_ops(self.model) as counter:
                logits.append(self.model.classify_features(self.model.spatial_features(clip[None])))
            gflops.append(sum(counter.counts.values()) / 1e9)
        logits = torch.cat(logits) if logits else torch.empty(0, self.model.num_classes)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        names = getattr(datamodule, "class_names", None)
        scores, classes = logits.softmax(dim=-1).topk(min(5, logits.shape[-1]), dim=-1)
        top5 = [
            [
                {"class": c, "name": None if names is None else names[c], "score": s}
                for c, s in zip(row_classes, row_scores)
            ]
            for row_classes, row_scores in zip(classes.tolist(), scores.tolist())
        ]
        out = {
            "id": list(batch["id"]),
            "logits": logits,
            "label": logits.argmax(dim=-1),
            "top5": top5,
            "gflops": gflops,
        }
        if "path" in batch:  # a VideoFolderDataModule batch
            out["video"] = list(batch["path"])
        return out

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def _first_view(self, batch: Mapping[str, Any]) -> Tensor:
        """The first view of the batch's first video, as the spatial model sees
        it (normalised): (1, T, C, h, w)."""
        video = batch["video"][0][None]  # a (B, T, ...) tensor or a list of clips
        if "length" in batch:
            video = video[:, : int(batch["length"][0])]
        return self.model.preprocessing(video)[:, 0]

    @torch.no_grad()
    def token_map_frames(self, batch: Batch, max_steps: int = 16) -> Tensor | None:
        """The first frame of each tubelet step that :meth:`token_update_maps`
        shows, as the spatial model sees it: (steps, 3, h, w) in [0, 1]."""
        if not isinstance(batch, Mapping) or self.r is None:
            return None
        pre = self.model.preprocessing
        view = self._first_view(batch)[0]  # (T, C, h, w), normalised
        step = self.model.embedding.tubelet[0]
        return (view[: step * max_steps : step] * pre.std + pre.mean).clamp(0, 1)

    def token_map_frame_numbers(self, batch: Batch, max_steps: int = 16) -> list[int] | None:
        """The frame of the first view that starts each tubelet step shown by
        :meth:`token_update_maps` (the labels of its columns)."""
        if not isinstance(batch, Mapping) or self.r is None:
            return None
        step = self.model.embedding.tubelet[0]
        frames = self._first_view(batch).shape[1]
        return list(range(0, min(frames, step * max_steps), step))

    @torch.no_grad()
    def token_update_maps(self, batch: Batch, max_steps: int = 16) -> dict[str, Tensor]:
        """Which spatial tokens each qkv gate updated on each tubelet step of the
        first view of the first video, under the run's own top-r:
        ``{gate: (steps, h, w)}``."""
        if not isinstance(batch, Mapping) or self.r is None:
            return {}
        self.set_setting(EvalSetting("own"))
        view = self._first_view(batch)
        with record_token_updates(self.model.spatial) as records:
            self.model.spatial_forward(view[:, : self.model.embedding.tubelet[0] * max_steps])
        return update_maps(records, self.model.spatial.input_size, offset=1)
