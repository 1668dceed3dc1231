"""The evaluation protocol shared by the eventful LightningModules: a sweep of
test-time settings, per-setting metrics, and operation counts.

A subclass evaluates every batch under each setting of :attr:`EventfulEvalModule.sweep`
(dense model, top-r values or thresholds), updates that setting's metric and
adds the operations it counted to :attr:`EventfulEvalModule.ops_meter`. At the
end of a validation/test epoch this class computes every setting's metrics
(torchmetrics syncs them over DDP ranks), sums the operation counts over ranks
and logs ``{stage}/{setting}/{metric}`` (plus ``{stage}/{metric}`` of the first
setting, for checkpoint monitoring).

What callbacks read afterwards (e.g. :class:`eventful_pl.lightning.callbacks.GFlopsCallback`,
in ``on_validation_end``/``on_test_end``):

- ``eval_stage``: ``"val"`` or ``"test"``;
- ``eval_results``: ``{setting: {metric: value}}``, synced over ranks;
- ``eval_gflops``: ``{setting: {"total": ..., kind: ...}}``, GFlops per
  ``ops_meter.unit`` (video or frame), synced over ranks;
- ``sweep``: the settings, in order; ``model``: the network.

Pretrained weights (a subclass's ``pretrained`` option) are read by
:meth:`EventfulEvalModule.load_pretrained`, which the Trainer calls at the
start of fit, validate, test or predict (``on_*_start``), once the model is on
its device; never in ``__init__``, so ``load_from_checkpoint`` does not read a
file that may not exist on the machine that loads the checkpoint. When a
Lightning checkpoint is restored (``--ckpt_path``, ``load_from_checkpoint``)
its weights win and ``pretrained`` is not read at all. In plain Python, call
``module.load_pretrained()`` yourself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from eventful_pl.kernels import prepare_fused_kernels
from eventful_pl.lightning.rng_state import CHECKPOINT_KEY, capture_rng_states, restore_rng_states
from eventful_pl.lightning.sweep import EvalSetting, OpsMeter, build_sweep

STAGES = ("val", "test")


class NonFiniteLossError(FloatingPointError):
    """A training loss is NaN or infinite; the run stops before it updates the weights."""


def metric_key(name: str) -> str:
    """A ModuleDict-safe key for setting ``name`` (``threshold=0.2`` -> ``threshold=0_2``)."""
    return name.replace(".", "_")


class EventfulEvalModule(L.LightningModule):
    """Base LightningModule: sweep settings, per-setting metrics, operation meter.

    Args:
        eval_r: Test-time top-r values to sweep in validation and test.
        eval_thresholds: Test-time thresholds to sweep.
        unit: What the GFlops are counted per (``"video"`` or ``"frame"``).
        default_setting: Name of the single setting when nothing is swept.
        eval_dense: Also evaluate the dense model (setting ``dense``, last):
            every token recomputed, GFlops of the dense model.
    """

    #: Name of the metric monitored by default (logged as ``{stage}/{main_metric}``).
    main_metric: str = ""

    def __init__(
        self,
        eval_r: Sequence[int] | None = None,
        eval_thresholds: Sequence[float] | None = None,
        unit: str = "video",
        default_setting: str = "default",
        eval_dense: bool = False,
    ) -> None:
        super().__init__()
        for r in eval_r or ():
            if int(r) <= 0:
                raise ValueError(f"eval_r: every r must be positive, got {list(eval_r)}")
        for h in eval_thresholds or ():
            if float(h) < 0:
                raise ValueError(f"eval_thresholds: must be >= 0, got {list(eval_thresholds)}")
        self.sweep: list[EvalSetting] = build_sweep(
            eval_r or (), eval_thresholds or (), default_setting, eval_dense
        )
        self.ops_meter = OpsMeter(unit)
        self.eval_stage: str | None = None
        self.eval_results: dict[str, dict[str, float]] = {}
        self.eval_gflops: dict[str, dict[str, float]] = {}
        self.eval_metrics = nn.ModuleDict()
        #: Whether the pretrained weights were loaded (or a restored checkpoint's replaced them).
        self.pretrained_done = False

    # ------------------------------------------------------------ for subclasses

    def build_eval_metrics(self) -> None:
        """Makes each stage's metrics per setting; call at the end of ``__init__``."""
        for stage in STAGES:
            self.eval_metrics[stage] = nn.ModuleDict(
                {metric_key(s.name): self.make_metrics() for s in self.sweep}
            )

    def make_metrics(self) -> Metric | MetricCollection:
        """A fresh metric (or collection) for one setting of one stage."""
        raise NotImplementedError

    def metrics(self, stage: str, setting: EvalSetting) -> Metric | MetricCollection:
        """The metric of ``setting`` in ``stage`` (``"val"`` or ``"test"``)."""
        return self.eval_metrics[stage][metric_key(setting.name)]

    @staticmethod
    def stage_of(trainer_stage: str) -> str:
        return "test" if trainer_stage == "test" else "val"

    def read_pretrained(self) -> None:
        """Loads the ``pretrained`` option's weights into the network (a subclass's job)."""

    def load_pretrained(self) -> None:
        """Loads the pretrained weights now (at most once; later calls do nothing).

        The Trainer calls it at the start of each stage; call it yourself when
        using the module without a Trainer.
        """
        if not self.pretrained_done:
            self.read_pretrained()
            self.pretrained_done = True

    def ensure_pretrained(self) -> None:
        """:meth:`load_pretrained`, unless a Lightning checkpoint is being restored."""
        if self._trainer is not None and self.trainer.ckpt_path:
            self.pretrained_done = True
        self.load_pretrained()

    # ----------------------------------------------------------------- hooks

    def on_fit_start(self) -> None:
        self.ensure_pretrained()

    def on_validation_start(self) -> None:
        self.ensure_pretrained()

    def on_test_start(self) -> None:
        self.ensure_pretrained()

    def on_predict_start(self) -> None:
        self.ensure_pretrained()

    def setup(self, stage: str) -> None:
        """Builds (once per source, if needed) and loads the fused CPU kernels,
        local rank 0 first, not in the first frame; refuses data whose class
        count differs from the network's (before a label out of range fails
        deep inside a loss)."""
        prepare_fused_kernels(self._trainer)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        data_classes = getattr(datamodule, "num_classes", None)
        model_classes = getattr(getattr(self, "model", None), "num_classes", None)
        if data_classes is not None and model_classes is not None:
            if int(data_classes) != int(model_classes):
                raise ValueError(
                    f"{type(datamodule).__name__} has {data_classes} classes but the model "
                    f"has {model_classes}: set model_kwargs.num_classes: {data_classes} "
                    "(or use the data the preset was made for)"
                )

    def check_finite_loss(self, loss: Tensor, ids: Sequence[Any] | None) -> None:
        """Stops the run (every rank at once) when ``loss`` is not finite, before
        the optimizer step writes NaN into the weights; the message names the
        batch's items (``ids``) so the bad inputs can be found."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            bad_anywhere = trainer.strategy.reduce_boolean_decision(bad, all=False)
        else:
            bad_anywhere = bad
        if not bad_anywhere:
            return
        where = ""
        if trainer is not None:
            where = f" at epoch {trainer.current_epoch}, global step {trainer.global_step}"
        if bad:
            shown = ", ".join(str(i) for i in list(ids)[:32]) if ids is not None else "unknown"
            value = float(loss.detach().float().sum())
            what = f"the training loss is {value}{where} for the batch of: {shown}"
        else:
            what = f"the training loss is not finite on another rank{where}"
        raise NonFiniteLossError(
            f"{what}. The run stops before this step changes the weights. Check these "
            "inputs (their videos or feature-cache entries) or lower the learning rate, "
            "then resume from the last checkpoint with --ckpt_path."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Saves the random generators' states (dropout, shuffles, worker seeds)."""
        checkpoint[CHECKPOINT_KEY] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the generators saved by :meth:`on_save_checkpoint`, so a
        resumed run draws what the uninterrupted run would have drawn. The
        checkpoint's weights replace the pretrained ones, which are not read."""
        self.pretrained_done = True
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is not None:
            restore_rng_states(states)

    def _begin_eval(self, stage: str) -> None:
        self.eval_stage = stage
        self.ops_meter.reset()
        for metric in self.eval_metrics[stage].values():
            metric.reset()

    def _end_eval(self, stage: str) -> None:
        results: dict[str, dict[str, float]] = {}
        for setting in self.sweep:
            metric = self.metrics(stage, setting)
            computed = metric.compute()
            if not isinstance(computed, dict):
                computed = {self.main_metric: computed}
            values = {k: float(v) for k, v in computed.items() if torch.as_tensor(v).numel() == 1}
            results[setting.name] = values
            metric.reset()
            for key, value in values.items():
                # Already synced by torchmetrics: every rank has the same value, so
                # sync_dist (a mean over ranks) keeps it and quiets Lightning's warning.
                self.log(f"{stage}/{setting.name}/{key}", value, sync_dist=True)
        first = results[self.sweep[0].name]
        if self.main_metric in first:
            self.log(f"{stage}/{self.main_metric}", first[self.main_metric], sync_dist=True)
        names = [s.name for s in self.sweep]
        synced = self.ops_meter.synced(names, self.device)
        self.eval_results = results
        self.eval_gflops = {n: synced.gflops(n) for n in names if synced.units.get(n)}
        self.ops_meter.reset()

    def on_validation_epoch_start(self) -> None:
        self._begin_eval("val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._begin_eval("test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")
