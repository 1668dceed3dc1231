"""The project's LightningCLI: safe checkpoint loading, the command line over
the checkpoint, and a config copy that never replaces a file.

Three differences from plain :class:`~lightning.pytorch.cli.LightningCLI`:

- ``--ckpt_path`` files are read with ``torch.load(weights_only=True)``
  (tensors and plain containers only, no code run); ``--weights_only false``
  is the explicit opt-in for a trusted file that needs more.
- The checkpoint's stored hyper-parameters never override the config or the
  command line: with a model configured, its class must be the checkpoint's
  (else a clear error) and the configured values are used, with a note of
  those that differ from the checkpoint's. Only without a configured model
  does the checkpoint's model (class and arguments) come from the file.
- The run's config is saved as ``config.yaml`` in the run's log directory
  (the logger's version folder); an existing file is never replaced: the
  copy goes to the first free ``config.N.yaml`` instead.

:func:`cli_main` is the command line (``python cli.py`` and, through
:func:`main`, the ``eventful-pl`` console script): LightningCLI's ``fit``,
``validate``, ``test`` and ``predict``, plus ``count`` and
``cache-features``, all reading the same YAML
configs (``--config`` may be given several times: later files override
earlier ones). The LightningModules and data modules of the project are
imported here, so their short names work (``--model ViTDetModule``,
``--data.videos KineticsDataModule``). Lightning's "Tip" messages advertising
other products are filtered out of its log.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

# Imported for their short names on the command line (jsonargparse resolves a
# class name among the imported subclasses of the expected type).
from datamodules.epic_kitchens import EpicKitchensDataModule  # noqa: F401
from datamodules.features import FeatureDataModule  # noqa: F401
from datamodules.finetune import ViViTFineTuneDataModule  # noqa: F401
from datamodules.imagenet_vid import ImageNetVIDDataModule  # noqa: F401
from datamodules.kinetics import KineticsDataModule  # noqa: F401
from eventful_pl.lightning import callbacks as _callbacks  # noqa: F401
from eventful_pl.lightning.vitdet_module import ViTDetModule  # noqa: F401
from eventful_pl.lightning.vivit_module import ViViTFineTuning  # noqa: F401

CONFIG_NAME = "config.yaml"

#: The subcommands :func:`cli_main` runs itself: name -> (module with a
#: ``main(argv)``, one-line help).
EXTRA_SUBCOMMANDS = {
    "count": (
        "eventful_pl.lightning.count_command",
        "Operation counts (GFlops) of a config's model, dense and per r / threshold.",
    ),
    "cache-features": (
        "eventful_pl.lightning.cache_command",
        "Write the frozen spatial model's feature caches of a fine-tuning config.",
    ),
    "calibrate": (
        "eventful_pl.lightning.calibrate_command",
        "Per-gate thresholds that meet a compute budget (a calibration file).",
    ),
}

#: Loggers through which Lightning prints its messages (``rank_zero_info``).
_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _NoAdvertisingTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing ..." product suggestions."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip:")


def hide_lightning_tips() -> None:
    """Filters Lightning's advertising tips out of its log (once; other messages stay)."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvertisingTips) for f in logger.filters):
            logger.addFilter(_NoAdvertisingTips())


class CheckpointConflictError(ValueError):
    """``--ckpt_path`` names a checkpoint that does not fit the configured run."""


def free_config_path(log_dir: str | Path, name: str = CONFIG_NAME) -> Path:
    """``log_dir/name`` if no such file exists, else the first free ``stem.N.suffix``."""
    path = Path(log_dir) / name
    index = 1
    while path.exists():
        path = path.with_name(f"{Path(name).stem}.{index}{Path(name).suffix}")
        index += 1
    return path


class RunConfigSaver(SaveConfigCallback):
    """Saves the parsed config into the run's log directory, never over a file."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # broadcast from rank 0
        if trainer.is_global_zero and log_dir is not None:
            path = free_config_path(log_dir, self.config_filename)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_unset=False, multifile=self.multifile)
            if path.name != self.config_filename:
                rank_zero_info(
                    f"{Path(log_dir) / self.config_filename} exists: config saved as {path}"
                )
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def read_lightning_checkpoint(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """A Lightning checkpoint's contents, read with ``weights_only`` unless told
    otherwise; a file that needs more is refused with a message naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        raise CheckpointConflictError(
            f"--ckpt_path {path}: the checkpoint holds more than tensors and plain "
            "containers, so reading it would run code named in the file; it was not "
            "loaded. If you trust its origin, add --weights_only false."
        ) from error


def _plain(value: Any) -> Any:
    """Namespaces and tuples as dicts and lists, for comparing values."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class EventfulCLI(LightningCLI):
    """LightningCLI with the checkpoint and config rules of this module's docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        hide_lightning_tips()
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's subcommands, and :data:`EXTRA_SUBCOMMANDS` for ``--help``
        (:func:`cli_main` runs those before LightningCLI parses anything)."""
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action
        if action is None:
            return
        for name, (_, description) in EXTRA_SUBCOMMANDS.items():
            sub = ArgumentParser(description=f"{description} Run '{name} --help' for options.")
            action.add_subcommand(name, sub, help=description)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        weights_only = config.get("weights_only") is not False
        checkpoint = read_lightning_checkpoint(ckpt_path, weights_only)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        stored_class = hparams.pop("_class_path", None)
        model = config.get("model")
        configured = model.get("class_path") if model is not None else None
        if configured is None:
            if stored_class is not None:  # no model configured: the checkpoint's
                self.config = self.parser.parse_object(
                    {subcommand: {"model": {"class_path": stored_class, "dict_kwargs": hparams}}},
                    self.config,
                )
            return
        if stored_class is not None and stored_class != configured:
            raise CheckpointConflictError(
                f"--ckpt_path {ckpt_path} holds a {stored_class} but the configured model is "
                f"{configured}: use a checkpoint of that class, or set --model to "
                f"{stored_class.rsplit('.', 1)[-1]}"
            )
        init_args = _plain(model.get("init_args")) or {}
        differ = [
            f"{key}={init_args[key]!r} (checkpoint: {value!r})"
            for key, value in sorted(hparams.items())
            if key in init_args and _plain(value) != init_args[key]
        ]
        if differ:
            rank_zero_info(
                f"--ckpt_path {ckpt_path}: the configured model options win over the "
                f"checkpoint's: {'; '.join(differ)}"
            )

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            if kwargs.get("weights_only") is None:
                kwargs["weights_only"] = True
        return kwargs


def cli_main(args: Sequence[str] | None = None) -> EventfulCLI | dict | list:
    """Runs the command line on ``args`` (default: the process's own arguments).

    ``count``, ``cache-features`` and ``calibrate`` go to their commands
    (:data:`EXTRA_SUBCOMMANDS`); everything else to :class:`EventfulCLI`.
    Returns the CLI object, or the command's report.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_SUBCOMMANDS:
        module = importlib.import_module(EXTRA_SUBCOMMANDS[argv[0]][0])
        return module.main(argv[1:])
    # args=None lets LightningCLI read sys.argv itself (no "args parameter" warning).
    return EventfulCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else argv,
    )


def main() -> None:
    """The ``eventful-pl`` console script: :func:`cli_main` on the process's
    arguments. Returns nothing, so the exit status is 0 on success."""
    cli_main()
