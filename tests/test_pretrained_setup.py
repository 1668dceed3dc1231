"""``pretrained`` is read when a stage starts, not at construction: before the
feature cache is written, and never when a Lightning checkpoint is restored."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from datamodules.features import MANIFEST, feature_cache_dir
from datamodules.synthetic_video import make_kinetics
from eventful_pl.lightning.feature_cache import spatial_weights_hash
from eventful_pl.lightning.vivit_module import ViViTFineTuning
from tests.test_lightning_vivit import MODEL_KWARGS, SYNTHETIC, datamodule, module, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinetics_tiny")
    make_kinetics(path, task="colour_order", **SYNTHETIC)
    return path


def spatial(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("spatial.", "embedding."))}


@pytest.mark.slow
def test_pretrained_is_loaded_before_the_cache_is_written_and_not_read_on_restore(tmp_path, root):
    torch.manual_seed(5)
    source = ViViTFineTuning(preset="vivit_tiny", model_kwargs=MODEL_KWARGS, r=8).model
    weights = tmp_path / "spatial.pth"
    torch.save(source.state_dict(), weights)

    lit = module(pretrained=str(weights))  # nothing read yet
    assert not all(torch.equal(v, spatial(source)[k]) for k, v in spatial(lit.model).items())
    ckpt = tmp_path / "ckpt"
    first = trainer(
        tmp_path,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt, save_last=True)],
    )
    first.fit(lit, datamodule(root, tmp_path / "cache"))
    for key, value in spatial(lit.model).items():  # frozen: still the pretrained weights
        assert torch.equal(value, spatial(source)[key]), key
    cache = feature_cache_dir(tmp_path / "cache", "kinetics400", "train", 8)
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["spatial_hash"] == spatial_weights_hash(source)  # written after loading

    weights.unlink()  # e.g. another machine: the checkpoint holds the weights
    restored = ViViTFineTuning.load_from_checkpoint(ckpt / "last.ckpt", weights_only=True)
    for key, value in restored.model.state_dict().items():
        assert torch.equal(value, lit.model.state_dict()[key]), key
    trainer(tmp_path).validate(restored, datamodule(root, tmp_path / "cache"))
    resumed = module(pretrained=str(weights))
    second = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    second.fit(resumed, datamodule(root, tmp_path / "cache"), ckpt_path=str(ckpt / "last.ckpt"))
    assert second.global_step == 4
    with pytest.raises(FileNotFoundError):  # in plain Python the file is read on request
        module(pretrained=str(weights)).load_pretrained()
