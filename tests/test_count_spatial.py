"""``count`` on pooled models: the model's own cost beside the base model's.

Paper numbers: ViTDet-B spatial (keys/values pooled 2 x 2 in the global blocks)
costs 159.7 GFlops per frame at 672 and 388.1 at 1024; the base model 174.5 and
467.4.
"""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from eventful_pl.counting import OP_KINDS, count_ops
from eventful_pl.lightning.count_command import _read_video, main
from eventful_pl.models.gflops import content_dependent_top_r, count_vitdet
from eventful_pl.models.vitdet import ViTDet
from eventful_pl.policies import TopRPolicy

ROOT = Path(__file__).resolve().parents[1]

TINY_ARGS = dict(
    num_classes=3, image_size=128, dim=64, depth=4, heads=4, window_size=4,
    window_block_indices=(0, 2), position_encoding_size=4, relative_embedding_size=8,
    pyramid_channels=32, box_conv_dims=(32, 32), box_fc_dims=(64,),
)  # fmt: skip

TINY_SPATIOTEMPORAL = """
model:
  class_path: eventful_pl.models.vitdet.ViTDet
  init_args:
    num_classes: 3
    image_size: 128
    dim: 64
    depth: 4
    heads: 4
    window_size: 4
    window_block_indices: [0, 2]
    position_encoding_size: 4
    relative_embedding_size: 8
    pyramid_channels: 32
    box_conv_dims: [32, 32]
    box_fc_dims: [64]
    variant: spatiotemporal
    policy:
      class_path: eventful_pl.policies.TopRPolicy
      init_args: {r: 8}
"""


def run(capsys, argv):
    """The table and the JSON report of one ``count`` command line."""
    main(argv)
    table = capsys.readouterr().out
    report = main([*argv, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    return table, printed


def row(table, label):
    (line,) = [x for x in table.splitlines() if x.strip().startswith(label)]
    return line.split()


@pytest.mark.parametrize(
    "size, spatial, base", [(672, 159.7, 174.5), (1024, 388.1, 467.4)]
)  # fmt: skip
@pytest.mark.slow
def test_spatial_config_reports_the_pooled_model_beside_the_base(capsys, size, spatial, base):
    files = ["vid.yaml", *(["vid/672.yaml"] if size == 672 else []), "vid/spatial.yaml"]
    config = [a for f in files for a in ("--config", str(ROOT / "configs" / "vitdet" / f))]
    table, report = run(capsys, config)
    dense, own = report["settings"]
    assert (dense["name"], dense["role"]) == ("dense", "base")
    assert (own["name"], own["role"]) == ("spatial", "model")
    # To the paper's precision (one decimal).
    assert round(own["total"], 1) == spatial and round(dense["total"], 1) == base
    assert own["first_frame"] == own["later_frame"] == pytest.approx(own["total"])
    assert sum(own["by_kind"].values()) == pytest.approx(own["total"])
    # Pooling only shrinks the global blocks' attention; the linear layers are the same.
    assert own["by_kind"]["linear"] == pytest.approx(dense["by_kind"]["linear"])
    assert own["by_kind"]["matmul"] < dense["by_kind"]["matmul"]
    # The table labels both rows.
    assert row(table, "spatial (model)")[2] == f"{own['total']:.3f}"
    assert row(table, "dense (base model)")[3] == f"{dense['total']:.3f}"
    # --no_dense leaves the model's own row.
    (alone,) = main([*config, "--no_dense"])["settings"]
    assert alone == own


@pytest.mark.parametrize(
    "config, base",
    [
        (["vid.yaml", "vid/672.yaml"], 174.5),
        (["vid.yaml", "vid/tokenwise.yaml"], 467.4),
        (["vid.yaml", "vid/672.yaml", "vid/spatiotemporal.yaml"], 174.5),
        (["vid.yaml"], 467.4),
    ],
)
@pytest.mark.slow
def test_other_configs_report_only_the_base_model(capsys, config, base):
    files = [a for f in config for a in ("--config", str(ROOT / "configs" / "vitdet" / f))]
    table, report = run(capsys, files)
    (dense,) = report["settings"]
    assert (dense["name"], dense["role"]) == ("dense", "base")
    assert round(dense["total"], 1) == base
    assert row(table, "dense (base model)")[3] == f"{dense['total']:.3f}"


def write_clip(path, frames=5):
    """A bright square moving over a dark frame, as an MPEG-4 file."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for t in range(frames):
            image = np.full((64, 96, 3), 40, dtype=np.uint8)
            image[10:30, 5 + 8 * t : 25 + 8 * t] = 250
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def counted_frames(model, video):
    """Backbone counts of each frame of ``video``, one stream, by a counted forward."""
    model.reset()
    totals = []
    with torch.no_grad():
        for frame in video:
            with count_ops(model.backbone) as counter:
                model.backbone_forward(model.preprocessing(frame[None]).tensors)
            totals.append(dict(counter.counts))
    model.reset()
    return totals


def test_pooled_top_r_is_measured_on_the_video(tmp_path):
    torch.manual_seed(0)
    model = ViTDet(**TINY_ARGS, variant="spatiotemporal", policy=TopRPolicy(32)).eval()
    assert content_dependent_top_r(model)
    assert not content_dependent_top_r(ViTDet(**TINY_ARGS, variant="eventful"))
    assert not content_dependent_top_r(ViTDet(**TINY_ARGS, variant="spatial"))
    video = _read_video(write_clip(tmp_path / "clip.mp4"))
    report = count_vitdet(model, r_values=[8], video=video, include_dense=False)
    (measured,) = report["settings"]
    assert measured["measured_on"] == "video"
    model.set_policy(TopRPolicy(8))
    frames = counted_frames(model, video)
    totals = [sum(f.values()) / 1e9 for f in frames]
    assert measured["first_frame"] == pytest.approx(totals[0])
    assert measured["later_frame"] == pytest.approx(sum(totals[1:]) / (len(totals) - 1))
    assert measured["total"] == pytest.approx(sum(totals) / len(totals))
    for kind in OP_KINDS:
        mean = sum(f.get(kind, 0) for f in frames) / len(frames) / 1e9
        assert measured["by_kind"][kind] == pytest.approx(mean)
    # The updates follow the square: fewer pooled cells than random tokens touch.
    (scattered,) = count_vitdet(model, r_values=[8], include_dense=False)["settings"]
    assert scattered["measured_on"] == "random tokens"
    assert measured["later_frame"] < scattered["later_frame"]
    assert model.backbone.blocks[1].qkv_gate.policy.r == 8  # the policy is restored


@pytest.mark.slow
def test_count_command_flags_how_pooled_top_r_was_counted(tmp_path, capsys):
    config = str(tmp_path / "config.yaml")
    Path(config).write_text(TINY_SPATIOTEMPORAL)
    clip = write_clip(tmp_path / "clip.mp4")
    table, report = run(capsys, ["--config", config, "--r", "8", "--video", clip])
    dense, r8 = report["settings"]
    assert r8["measured_on"] == "video" and report["video_frames"] == 5
    assert "note: r8: measured on the video (average over its 5 frames)" in table
    table, report = run(capsys, ["--config", config, "--r", "8"])
    assert report["settings"][1]["measured_on"] == "random tokens"
    assert "note: r8: pooled eventful attention" in table and "--video" in table
