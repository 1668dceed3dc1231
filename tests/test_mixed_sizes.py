"""Clips of different frame sizes (aspect ratios) share evaluation batches.

Real Kinetics clips differ in aspect ratio. Any ``eval_batch_size`` must work
on them and give exactly what ``eval_batch_size=1`` gives: the same clips from
the data module's eval loader, the same per-video logits and the same accuracy
from the LightningModule. Everything reads real mp4 files in the Kinetics
layout, with clips of 32 x 32, 32 x 48 and 48 x 32 pixels in every split.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.kinetics import KineticsDataModule
from datamodules.synthetic_video import make_kinetics, moving_square, write_video
from eventful_pl.lightning.vivit_module import ViViTFineTuning
from tests.helpers import SMALL_CLIPS, quiet_trainer_options

# Three spatial views: the model crops each clip at its own size (left/centre/right).
MODEL_KWARGS = {"image_size": 32, "tubelet": [2, 8, 8], "temporal_views": 1, "spatial_views": 3}
SIZES = ((32, 32), (32, 48), (48, 32))  # (H, W); the short side is 32 in all three

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """4 classes x 2 clips per split, 8-10 frames; clip k of a split is SIZES[k % 3]."""
    path = tmp_path_factory.mktemp("kinetics_mixed")
    data = make_kinetics(
        path, videos_per_class=2, frames=8, size=32, frame_jitter=2, task="colour_order"
    )
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, item in enumerate(data.items[split]):
            if SIZES[k % 3] != (32, 32):
                frames = moving_square(k % 4, item.num_frames, SIZES[k % 3], rng)
                write_video(item.path, frames)
    return path


def videos(root: Path, **kwargs) -> KineticsDataModule:
    options = dict(SMALL_CLIPS, eval_batch_size=1, eval_short_side=32)
    return KineticsDataModule(str(root), **{**options, **kwargs})


def module() -> ViViTFineTuning:
    torch.manual_seed(0)
    return ViViTFineTuning(
        preset="vivit_tiny", model_kwargs=MODEL_KWARGS, r=8, eval_r=[16, 4], lr=1e-3
    )


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = {"max_epochs": 1, "logger": False, **quiet_trainer_options(tmp_path)}
    return L.Trainer(**{**options, **kwargs})


def eval_clips(dm: KineticsDataModule) -> dict[str, tuple[torch.Tensor, int]]:
    """Clip id -> (its frames, label) from the val loader, padding cut off."""
    dm.setup("validate")
    clips = {}
    for batch in dm.val_dataloader():
        assert not batch["skipped"]
        for clip, length, label, clip_id in zip(
            batch["video"], batch["length"], batch["label"], batch["id"]
        ):
            clips[clip_id] = (clip[:length], int(label))
    return clips


@pytest.mark.parametrize("eval_batch_size", [3, 8])
def test_eval_loader_batches_clips_of_three_frame_sizes(root, eval_batch_size):
    single = eval_clips(videos(root))
    assert {tuple(clip.shape[-2:]) for clip, _ in single.values()} == set(SIZES)
    batched = eval_clips(videos(root, eval_batch_size=eval_batch_size))
    assert list(batched) == list(single)  # every clip once, in the same order
    for clip_id, (clip, label) in single.items():
        assert torch.equal(batched[clip_id][0], clip) and batched[clip_id][1] == label


@pytest.mark.parametrize("eval_batch_size", [3, 8])
@pytest.mark.slow
def test_validation_and_predictions_equal_batch_size_one(tmp_path, root, eval_batch_size):
    results, logits = [], []
    for size in (1, eval_batch_size):
        lit = module()
        trainer(tmp_path).validate(lit, videos(root, eval_batch_size=size), verbose=False)
        results.append((lit.eval_results, lit.eval_gflops))
        batches = trainer(tmp_path).predict(lit, videos(root, eval_batch_size=size))
        logits.append({i: row for b in batches for i, row in zip(b["id"], b["logits"])})
    assert results[1][0] == results[0][0]  # top-1 / top-5 of every setting
    for setting, gflops in results[0][1].items():
        assert results[1][1][setting] == pytest.approx(gflops, rel=1e-12)
    assert list(logits[1]) == list(logits[0]) and len(logits[0]) == 8
    for clip_id, row in logits[0].items():
        torch.testing.assert_close(logits[1][clip_id], row)


def test_whole_clip_training_batches_mix_frame_sizes(tmp_path, root):
    """Training on whole clips (``train_clips="whole"``) batches them the same way."""
    dm = videos(root, train_clips="whole", batch_size=4)
    dm.setup("fit")
    sizes = [{tuple(clip.shape[-2:]) for clip in batch["video"]} for batch in dm.train_dataloader()]
    assert any(len(s) > 1 for s in sizes)
    lit = module()
    fit = trainer(tmp_path)
    fit.fit(lit, dm)
    assert fit.global_step == 2 and np.isfinite(float(fit.callback_metrics["train/loss"]))
    assert set(lit.eval_results) == {"r8", "r16", "r4"}  # validated on the mixed val split too
