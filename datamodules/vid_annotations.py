"""ImageNet VID / DET annotations: parse both on-disk layouts into one record type.

Two layouts are read without conversion (docs/data-formats.md):

* the ILSVRC2015 tree (``Data/VID/<split>/<snippet>/000000.JPEG`` next to
  ``Annotations/VID/<split>/<snippet>/000000.xml``, PASCAL-VOC style XML with
  ``trackid``; ``ImageSets/VID/<split>*.txt`` lists when present; DET images under
  ``Data/DET/train`` with XML under ``Annotations/DET/train``);
* the COCO-style JSON conversion (``images`` with ``file_name``, ``id``,
  ``width``, ``height`` and for video frames ``video_id`` / ``frame_id``;
  ``annotations`` with ``bbox`` xywh and 1-based ``category_id``; ``categories``).

Both give :class:`FrameAnnotation` records (boxes xyxy in pixels, labels 0..29 in
the order of :data:`VID_CLASSES`), VID frames grouped into :class:`VideoAnnotation`::

    videos, stats = index_ilsvrc_vid("/data/ILSVRC2015", "val")
    det, det_stats = index_ilsvrc_det("/data/ILSVRC2015")
    videos, stats = load_coco_vid("annotations/imagenet_vid_val.json", "/data/ILSVRC2015/Data/VID")

Box conventions: XML corner values are used as they are and COCO ``[x, y, w, h]``
becomes ``[x, y, x + w, y + h]`` (so a COCO conversion of the XML gives the same
boxes). Boxes are clipped to the image; boxes that are then empty (zero width or
height) are dropped and counted. A box with ``xmax < xmin`` (or ``ymax < ymin``,
or a negative COCO width/height) is a format error. Objects of classes outside
the 30 are dropped (and counted) in DET files and in COCO files whose categories
name other classes; in VID XML files an unknown WordNet id is a format error.

This module gathers the names of the three modules that hold the code (import
from here or from them):

* :mod:`datamodules.vid_records`: the 30 classes, the record types, box
  clipping (:class:`ImageBoxes`) and :func:`select_frames`;
* :mod:`datamodules.vid_ilsvrc`: the ILSVRC2015 XML tree and ImageSets lists;
* :mod:`datamodules.vid_coco`: the COCO-style JSON files.
"""

# This module re-exports the names of the three modules below.
# ruff: noqa: F401
from __future__ import annotations

from datamodules.common import DataFormatError
from datamodules.vid_coco import (
    _NAME_TO_LABEL,
    _category_labels,
    _normalise,
    _parse_coco,
    _read_json,
    _require,
    _video_name,
    load_coco_det,
    load_coco_vid,
)
from datamodules.vid_ilsvrc import (
    _BOX_KEYS,
    ImageSetEntry,
    _snippets_by_walk,
    _xml_number,
    image_set_files,
    index_ilsvrc_det,
    index_ilsvrc_vid,
    parse_voc_xml,
    read_det_image_set,
    read_image_set,
)
from datamodules.vid_records import (
    _TRAILING_NUMBER,
    IMAGE_SUFFIX,
    VID_CLASSES,
    VID_WNIDS,
    WNID_TO_LABEL,
    FrameAnnotation,
    FrameSelector,
    ImageBoxes,
    IndexStats,
    VideoAnnotation,
    _all_frames,
    _frame_number,
    select_frames,
)
