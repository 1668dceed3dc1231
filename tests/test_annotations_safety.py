"""Annotation files as researchers really have them: byte-order marks, other
encodings, broken quoting, repeated ids, segments past the end of a video, XML
sizes that disagree with the JPEG, evaluation splits without objects, and bad
batch sizes. Every test reads or writes real files (CSV, mp4, JPEG, XML).
"""

from __future__ import annotations

import codecs
import csv
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.common import DataFormatError
from datamodules.epic_kitchens import EpicKitchensDataModule, read_segments
from datamodules.imagenet_vid import SIZE_MISMATCH, ImageNetVIDDataModule
from datamodules.kinetics import KineticsDataModule, read_annotations
from datamodules.synthetic_detection import write_synthetic_vid
from datamodules.synthetic_video import EPIC_COLUMNS, make_epic_kitchens
from datamodules.vid_annotations import parse_voc_xml
from datamodules.video import CLIPPED, probe_video, read_frames
from eventful_pl.lightning.vitdet_module import ViTDetModule
from tests.helpers import quiet_trainer_options

HEADER = "label,youtube_id,time_start,time_end,split"


def kinetics_csv(path: Path, *rows: str, encoding: str = "utf-8", bom: bool = False) -> Path:
    data = "\n".join([HEADER, *rows]).encode(encoding) + b"\n"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + data)
    return path


def epic_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_epic_rows(path: Path, rows: list[dict], bom: bool = False) -> None:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(EPIC_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def epic(tmp_path) -> Path:
    """One participant, two videos of three segments (32 x 32, 30 fps): the train CSV."""
    make_epic_kitchens(tmp_path, participants=1, segments_per_video=3, size=32)
    return tmp_path / "EPIC_100_train.csv"


# --------------------------------------------------------------------------- encodings


def test_csv_with_a_byte_order_mark_reads_as_utf8(tmp_path, epic):
    path = kinetics_csv(
        tmp_path / "val.csv",
        "zoom down,abcdefghijk,1,11,val",
        "Kite up,bcdefghijkl,2,12,val",
        bom=True,
    )
    rows = read_annotations(path)
    assert [(r.label, r.clip, r.line) for r in rows] == [
        ("zoom down", "abcdefghijk_000001_000011", 2),
        ("Kite up", "bcdefghijkl_000002_000012", 3),
    ]
    plain = read_segments(epic, epic.parent)
    write_epic_rows(epic, epic_rows(epic), bom=True)  # as Excel saves "CSV UTF-8"
    assert epic.read_bytes().startswith(codecs.BOM_UTF8)
    assert read_segments(epic, epic.parent) == plain


def test_a_byte_that_is_not_utf8_names_file_line_and_column(tmp_path, epic):
    path = kinetics_csv(
        tmp_path / "val.csv",
        "zoom down,abcdefghijk,1,11,val",
        "café,bcdefghijkl,2,12,val",
        encoding="latin-1",
    )
    with pytest.raises(DataFormatError, match="not UTF-8.*byte e9 at column 4") as error:
        read_annotations(path)
    assert error.value.path == path and error.value.line == 3
    assert f"{path}, line 3" in str(error.value)
    rows = epic_rows(epic)
    rows[1]["narration"] = "stir the pot"
    write_epic_rows(epic, rows)
    epic.write_bytes(epic.read_bytes().replace(b"stir the pot", b"stir the \x93pot\x94"))
    with pytest.raises(DataFormatError, match="not UTF-8") as error:
        EpicKitchensDataModule(str(epic.parent), num_workers=0).setup("fit")
    assert error.value.path == epic and error.value.line == 3


def test_csv_parser_errors_name_the_file(tmp_path):
    # An unbalanced quote swallows the rest of the file into one field, until
    # the csv module's field size limit stops it.
    filler = [f"zoom down,id{k:09d},1,11,val" for k in range(6000)]
    path = kinetics_csv(tmp_path / "val.csv", 'zoom down,"abcdefghijk,1,11,val', *filler)
    with pytest.raises(DataFormatError, match="malformed CSV.*field larger") as error:
        read_annotations(path)
    assert error.value.path == path and str(path) in str(error.value)
    assert error.value.line == 2  # where the unbalanced quote is


# --------------------------------------------------------------------------- repeated ids


def test_duplicate_ids_are_counted_in_one_warning(tmp_path):
    row, other = "zoom down,abcdefghijk,1,11,val", "Kite up,bcdefghijkl,2,12,val"
    path = kinetics_csv(tmp_path / "val.csv", row, other, row, other, row)
    with pytest.warns(UserWarning) as caught:
        rows = read_annotations(path)
    assert [r.line for r in rows] == [2, 3]
    (message,) = [str(w.message) for w in caught]
    assert f"{path}: 3 duplicate row(s)" in message
    assert "'abcdefghijk_000001_000011' on line 4 repeats line 2" in message


def test_conflicting_labels_for_one_id_name_both_lines(tmp_path, epic):
    path = kinetics_csv(
        tmp_path / "val.csv",
        "zoom down,abcdefghijk,1,11,val",
        "Kite up,bcdefghijkl,2,12,val",
        "Kite up,abcdefghijk,1,11,val",
    )
    with pytest.raises(DataFormatError, match="conflicting") as error:
        read_annotations(path)
    assert f"{path}:2 has label 'zoom down'" in str(error.value)
    assert f"{path}:4 has label 'Kite up'" in str(error.value)
    assert error.value.line == 4
    rows = epic_rows(epic)
    repeat = dict(rows[0], verb_class=str((int(rows[0]["verb_class"]) + 1) % 97))
    write_epic_rows(epic, [*rows, dict(rows[1]), repeat])
    with pytest.raises(DataFormatError, match="conflicting") as error:
        read_segments(epic, epic.parent)
    assert f"{epic}:2 has verb_class" in str(error.value) and error.value.line == 6
    assert f"{epic}:6 has verb_class" in str(error.value)
    write_epic_rows(epic, [*rows, dict(rows[1])])
    with pytest.warns(UserWarning, match=f"{epic}: 1 duplicate row"):
        assert [s.id for s in read_segments(epic, epic.parent)] == [r["narration_id"] for r in rows]


# --------------------------------------------------------------------------- segment bounds


@pytest.mark.parametrize("probe", [True, False])
def test_segment_past_the_video_end_is_clipped_with_a_counted_warning(epic, probe):
    rows = epic_rows(epic)
    video = probe_video(epic.parent / "P01" / "videos" / "P01_01.MP4")
    rows[2]["stop_frame"] = str(video.num_frames + 40)  # runs past the end: clipped
    rows[0]["start_frame"], rows[0]["stop_frame"] = "5000", "5100"  # after the end: skipped
    write_epic_rows(epic, rows)
    dm = EpicKitchensDataModule(
        str(epic.parent), num_workers=0, frames=4, crop_size=32, eval_short_side=0, probe=probe
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = dm.build_dataset("train", "eval")
        loaded = {dataset.items[i].id: dataset[i] for i in range(len(dataset))}
    messages = [str(w.message) for w in caught]
    clipped = [m for m in messages if CLIPPED in m]
    assert len(clipped) == 1 and rows[2]["narration_id"] in clipped[0]
    assert (
        f"ends at frame {video.num_frames + 40} of a {video.num_frames}-frame video" in clipped[0]
    )
    first = int(rows[2]["start_frame"]) - 1
    whole = read_frames(video_path(epic), range(first, video.num_frames))
    assert torch.equal(loaded[rows[2]["narration_id"]]["video"], whole)
    if probe:
        assert dm.summaries["train (eval)"] == (
            "epic_kitchens100 train: 2 items, 1 skipped (segment outside video: 1); "
            "1 adjusted (segment clipped to video end: 1)"
        )
        assert any("segment outside video" in m for m in messages)
    else:  # found while loading: counted in the dataset's own log
        assert dataset.skip_log.adjusted == {CLIPPED: 1}
        assert dataset.skip_log.reasons == {"unreadable": 1}  # the segment after the end


def video_path(epic: Path) -> Path:
    return epic.parent / "P01" / "videos" / "P01_01.MP4"


# --------------------------------------------------------------------------- ImageNet VID


def scale_xml(path: Path, factor: int) -> None:
    """Multiplies the ``<size>`` and every box corner of a VOC XML file by ``factor``."""
    tree = ET.parse(path)
    for element in tree.getroot().iter():
        if element.tag in ("width", "height", "xmin", "ymin", "xmax", "ymax"):
            element.text = str(int(element.text) * factor)
    tree.write(path)


def test_vid_xml_size_that_disagrees_with_the_jpeg_scales_boxes(tmp_path):
    data = write_synthetic_vid(tmp_path, seed=2, train_snippets=1, val_snippets=1, det_images=0)
    xmls = sorted((data.root / "Annotations" / "VID" / "val").rglob("*.xml"))
    want = [parse_voc_xml(x, other_classes=False).boxes for x in xmls]
    assert any(want)
    for xml in xmls[:2]:  # annotated at twice the resolution of the JPEGs
        scale_xml(xml, 2)
        assert parse_voc_xml(xml, other_classes=False).width == 192
    dm = ImageNetVIDDataModule(str(data.root), num_workers=0)
    dm.setup("validate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        targets = [t for i in range(len(dm.eval_dataset)) for t in dm.eval_dataset[i]["targets"]]
    assert [t["boxes"].tolist() for t in targets] == [[list(b) for b in w] for w in want]
    (message,) = [str(w.message) for w in caught]
    assert "annotated as 192 x 128, the image is 96 x 64" in message and SIZE_MISMATCH in message
    assert dm.eval_dataset.skips.adjusted == {SIZE_MISMATCH: 2}


def test_evaluation_without_ground_truth_objects_warns(tmp_path):
    data = write_synthetic_vid(
        tmp_path, seed=3, train_snippets=1, val_snippets=1, frames=(2, 2), det_images=0
    )
    for xml in (data.root / "Annotations" / "VID" / "val").rglob("*.xml"):
        tree = ET.parse(xml)
        for obj in tree.getroot().findall("object"):
            tree.getroot().remove(obj)
        tree.write(xml)
    dm = ImageNetVIDDataModule(str(data.root), num_workers=0)
    with pytest.warns(UserWarning, match="imagenet_vid val: no ground-truth objects in the 2"):
        dm.setup("validate")
    assert "(0 objects)" in dm.summaries["eval"]
    torch.manual_seed(0)
    lit = ViTDetModule(preset="vitdet_tiny", model_kwargs={"num_classes": 30}, r=16, eval_r=[8])
    trainer = L.Trainer(logger=False, **quiet_trainer_options(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(lit, dm, verbose=False)
    (message,) = [str(w.message) for w in caught if "ground-truth" in str(w.message)]
    assert "ViTDetModule val (split 'val')" in message and "['r16', 'r8']" in message
    assert lit.eval_results["r8"]["map_50"] == -1


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("cls", [KineticsDataModule, EpicKitchensDataModule])
@pytest.mark.parametrize("option", ["batch_size", "eval_batch_size"])
@pytest.mark.parametrize("value", [0, -2])
def test_batch_sizes_below_one_are_refused_at_construction(tmp_path, cls, option, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {option} must be a positive integer"):
        cls(str(tmp_path), **{option: value})
