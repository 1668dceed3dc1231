"""The evaluation protocol shared by the eventful LightningModules: a sweep of
test-time settings, per-setting metrics, and operation counts.

A subclass evaluates every batch under each setting of :attr:`EventfulEvalModule.sweep`
(dense model, top-r values or thresholds), updates that setting's metric and
adds the operations it counted to :attr:`EventfulEvalModule.ops_meter`. At the
end of a validation/test epoch this class computes every setting's metrics
(torchmetrics syncs them over DDP ranks), sums the operation counts over ranks
and logs with ``self.log`` (so the values are in Lightning's results table, in
what ``trainer.validate()``/``trainer.test()`` return, and can be monitored):

- ``{stage}/{setting}/{metric}`` and ``{stage}/{setting}/gflops`` for every
  setting (names like ``r16``, ``h0.1``, ``dense``: no ``=``);
- ``{stage}/{metric}`` and ``hp_metric``: the main metric of the run's own
  setting (:attr:`EventfulEvalModule.own_setting`, e.g. the r it trains
  with), which ``ModelCheckpoint(monitor="val/top1")`` then tracks.

Each evaluation also says in one line how many batches and settings it runs
(rank 0, Lightning's ``rank_zero_info``), next to Lightning's progress bar.

What callbacks read afterwards (e.g. :class:`eventful_pl.lightning.callbacks.GFlopsCallback`,
in ``on_validation_end``/``on_test_end``):

- ``eval_stage``: ``"val"`` or ``"test"``;
- ``eval_results``: ``{setting: {metric: value}}``, synced over ranks;
- ``eval_gflops``: ``{setting: {"total": ..., kind: ...}}``, GFlops per
  ``ops_meter.unit`` (video or frame), synced over ranks;
- ``sweep``: the settings, in order; ``own_setting``: the name of the run's
  own one; ``main_metric``; ``model``: the network.

Frozen parts of the network (:meth:`EventfulEvalModule.frozen_modules`) stay in
eval mode: ``module.train()`` leaves them in eval, Lightning's model summary
shows them as eval, and they are put back in eval when training starts.

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

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from eventful_pl.kernels import prepare_fused_kernels
from eventful_pl.lightning.rng_state import CHECKPOINT_KEY, capture_rng_states, restore_rng_states
from eventful_pl.lightning.sweep import (
    EvalSetting,
    OpsMeter,
    budget_settings,
    build_sweep,
    own_setting,
)

STAGES = ("val", "test")


class NonFiniteLossError(FloatingPointError):
    """A training loss is NaN or infinite; the run stops before it updates the weights."""


def metric_key(name: str) -> str:
    """A ModuleDict-safe key for setting ``name`` (``h0.2`` -> ``h0_2``)."""
    return name.replace(".", "_")


class EventfulEvalModule(L.LightningModule):
    """Base LightningModule: sweep settings, per-setting metrics, operation meter.

    Args:
        eval_r: Test-time top-r values to sweep in validation and test.
        eval_thresholds: Test-time thresholds to sweep.
        unit: What the GFlops are counted per (``"video"`` or ``"frame"``).
        default_setting: Name of the single setting when nothing is swept and
            the run has no own policy.
        eval_dense: Also evaluate the dense model (setting ``dense``, last):
            every token recomputed, GFlops of the dense model.
        own_r: The run's own top-r (the r it trains with), if any.
        own_threshold: The run's own threshold instead, if any.
        eval_budgets: Compute budgets to sweep (settings ``b<budget>``): each
            the calibrated per-gate thresholds filed under that budget in
            ``calibration``.
        calibration: The calibration file (``cli.py calibrate``) of ``eval_budgets``.

    The run's own setting (``own_r`` or ``own_threshold``) is evaluated even
    when the sweep does not list it (it is then added first); its main metric
    is logged as ``{stage}/{main_metric}`` and ``hp_metric``. Without an own
    policy, the first setting of the sweep stands in for it.
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
        own_r: int | None = None,
        own_threshold: float | None = None,
        eval_budgets: Sequence[float] | None = None,
        calibration: str | None = None,
    ) -> None:
        super().__init__()
        for r in eval_r or ():
            if int(r) <= 0:
                raise ValueError(f"eval_r: every r must be positive, got {list(eval_r)}")
        for h in eval_thresholds or ():
            if float(h) < 0:
                raise ValueError(f"eval_thresholds: must be >= 0, got {list(eval_thresholds)}")
        own = own_setting(own_r, own_threshold)
        self.sweep: list[EvalSetting] = build_sweep(
            eval_r or (),
            eval_thresholds or (),
            default_setting,
            eval_dense,
            own,
            budget_settings(eval_budgets or (), calibration),
        )
        #: The name of the run's own setting (the first setting without an own policy).
        self.own_setting: str = own.name if own is not None else self.sweep[0].name
        self.ops_meter = OpsMeter(unit)
        self.eval_stage: str | None = None
        self.eval_results: dict[str, dict[str, float]] = {}
        self.eval_gflops: dict[str, dict[str, float]] = {}
        self.eval_metrics = nn.ModuleDict()
        self._eval_started = 0.0
        #: Whether the pretrained weights were loaded (or a restored checkpoint's replaced them).
        self.pretrained_done = False

    # ------------------------------------------------------------ for subclasses

    def build_eval_metrics(self) -> None:
        """Makes each stage's metrics per setting; call at the end of ``__init__``."""
        for stage in STAGES:
            self.eval_metrics[stage] = nn.ModuleDict(
                {metric_key(s.name): self.make_metrics() for s in self.sweep}
            )

    def frozen_modules(self) -> list[nn.Module]:
        """Parts of the network that never train (kept in eval mode); none by default."""
        return []

    def train(self, mode: bool = True) -> EventfulEvalModule:
        """Sets training mode, except for :meth:`frozen_modules`, which stay in eval."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

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
        """Loads ``pretrained``. Lightning's model summary (a callback's
        ``on_fit_start``, before this hook) has shown the frozen parts in eval
        mode; the fit loop then warns about every module in eval mode when
        training starts, so until :meth:`on_train_start` they follow the
        module's own mode (the sanity check runs in eval mode anyway)."""
        self.ensure_pretrained()
        for module in self.frozen_modules():
            module.train(self.training)

    def on_train_start(self) -> None:
        """Puts the frozen parts back in eval mode for training."""
        for module in self.frozen_modules():
            module.eval()

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
        self._eval_started = time.perf_counter()
        trainer = self._trainer
        if trainer is not None and not trainer.sanity_checking:
            batches = trainer.num_test_batches if stage == "test" else trainer.num_val_batches
            total = sum(int(n) for n in batches if n != float("inf")) if batches else None
            names = ", ".join(s.name for s in self.sweep)
            rank_zero_info(
                f"{stage}: {total if total is not None else 'all'} batches on this rank, each "
                f"under {len(self.sweep)} setting{'s' if len(self.sweep) > 1 else ''} ({names})"
            )

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
        own = results.get(self.own_setting, {})
        if self.main_metric in own:
            self.log(f"{stage}/{self.main_metric}", own[self.main_metric], sync_dist=True)
            self.log("hp_metric", own[self.main_metric], sync_dist=True)
        names = [s.name for s in self.sweep]
        synced = self.ops_meter.synced(names, self.device)
        self.eval_results = results
        self.eval_gflops = {n: synced.gflops(n) for n in names if synced.units.get(n)}
        for name, gflops in self.eval_gflops.items():  # summed over ranks already
            self.log(f"{stage}/{name}/gflops", gflops["total"], sync_dist=True)
        units = max(synced.units.values(), default=0)  # (synced may be ops_meter itself)
        self.ops_meter.reset()
        trainer = self._trainer
        if trainer is not None and not trainer.sanity_checking:
            what = f", {units} {self.ops_meter.unit}s each" if units else ""
            seconds = time.perf_counter() - self._eval_started
            count = f"{len(self.sweep)} setting{'s' if len(self.sweep) > 1 else ''}"
            rank_zero_info(f"{stage}: {count} evaluated{what} ({seconds:.1f} s)")

    def on_validation_epoch_start(self) -> None:
        self._begin_eval("val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._begin_eval("test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")
