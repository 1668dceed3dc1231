"""The ``count`` command: config in, the count API's report out (table or JSON)."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from eventful_pl.lightning.count_command import main
from eventful_pl.models.gflops import count_vitdet, count_vivit
from eventful_pl.models.vitdet import ViTDet
from eventful_pl.models.vivit import FactorizedViViT
from eventful_pl.policies import TopRPolicy

ROOT = Path(__file__).resolve().parents[1]

VITDET_TINY = """
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
    variant: eventful
    policy:
      class_path: eventful_pl.policies.TopRPolicy
      init_args: {r: 32}
trainer:
  max_epochs: 3
data:
  class_path: some.module.NotImportedHere
"""

VIVIT_TINY = """
model:
  class_path: eventful_pl.models.vivit.FactorizedViViT
  init_args:
    num_classes: 4
    frames: 8
    image_size: 64
    dim: 64
    spatial_depth: 2
    temporal_depth: 1
    heads: 4
    temporal_stride: 1
    temporal_views: 2
    spatial_views: 1
    spatial_variant: full
"""

VITDET_ARGS = dict(
    num_classes=3, image_size=128, dim=64, depth=4, heads=4, window_size=4,
    window_block_indices=(0, 2), position_encoding_size=4, relative_embedding_size=8,
    pyramid_channels=32, box_conv_dims=(32, 32), box_fc_dims=(64,), variant="eventful",
)  # fmt: skip


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_json(capsys, argv):
    report = main([*argv, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    return printed


def test_vitdet_json_equals_the_api(tmp_path, capsys):
    printed = run_json(
        capsys,
        ["--config", write(tmp_path, VITDET_TINY), "--r", "16", "48", "--video_length", "10"],
    )
    assert printed["per"] == "frame" and printed["video_length"] == 10
    expected = count_vitdet(
        ViTDet(**VITDET_ARGS, policy=TopRPolicy(32)).eval(), [16, 48], video_length=10
    )
    assert [s["name"] for s in printed["settings"]] == ["dense", "r16", "r48"]
    assert [s["role"] for s in printed["settings"]] == ["base", None, None]
    for got, want in zip(printed["settings"], expected["settings"]):
        for key in ("total", "first_frame", "later_frame"):
            assert got[key] == pytest.approx(want[key])
        assert got["by_kind"] == pytest.approx(want["by_kind"])


def test_vivit_table_and_json(tmp_path, capsys):
    config = write(tmp_path, VIVIT_TINY)
    main(["--config", config, "--r", "8"])
    table = capsys.readouterr().out
    assert table.startswith("GFlops per video")
    assert table.splitlines()[2].split()[:3] == ["dense", "(base", "model)"]
    assert "r8" in table.splitlines()[3]
    printed = run_json(capsys, ["--config", config, "--r", "8", "--no_dense"])
    model = FactorizedViViT(
        num_classes=4, frames=8, image_size=64, dim=64, spatial_depth=2, temporal_depth=1,
        heads=4, temporal_stride=1, temporal_views=2, spatial_views=1, spatial_variant="full",
    ).eval()  # fmt: skip
    expected = count_vivit(model, [8], include_dense=False)
    assert printed["settings"][0]["total"] == pytest.approx(expected["settings"][0]["total"])


@pytest.mark.slow
def test_thresholds_read_the_given_video(tmp_path, capsys):
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for t in range(5):
            image = np.full((64, 96, 3), 40, dtype=np.uint8)
            image[10:40, 5 + 10 * t : 35 + 10 * t] = 250
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    printed = run_json(
        capsys,
        [
            "--config",
            write(tmp_path, VITDET_TINY),
            "--thresholds",
            "0.0",
            "1e9",
            "--video",
            str(path),
        ],
    )
    low, high = printed["settings"][1:]
    assert low["threshold"] == 0.0 and high["threshold"] == 1e9
    assert printed["video_length"] == 5
    assert high["later_frame"] < low["later_frame"]
    assert low["first_frame"] == pytest.approx(printed["settings"][0]["first_frame"])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="video"):
        main(["--config", write(tmp_path, VITDET_TINY), "--thresholds", "0.5"])
    linear = (
        "model:\n  class_path: torch.nn.Linear\n  init_args: {in_features: 2, out_features: 2}\n"
    )
    with pytest.raises(ValueError, match="cannot count Linear"):
        main(["--config", write(tmp_path, linear, "linear.yaml")])
    with pytest.raises(ValueError, match="--video: cannot read"):
        (tmp_path / "broken.mp4").write_bytes(b"not a video")
        main(["--config", write(tmp_path, VITDET_TINY), "--thresholds", "1", "--video",
              str(tmp_path / "broken.mp4")])  # fmt: skip


@pytest.mark.slow
def test_cli_entry_point_reproduces_published_vivit_counts():
    """``python cli.py count``: dense ViViT-B is 3.36 TFlops per Kinetics-400 video (paper)."""
    result = subprocess.run(
        [sys.executable, "cli.py", "count", "--config", "configs/vivit/kinetics400.yaml",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["settings"][0]["total"] == pytest.approx(3359.6, abs=0.5)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("eventful_pl.gflops", "eventful_pl.models.gflops"),
        ("eventful_pl.count_command", "eventful_pl.lightning.count_command"),
    ],
)
def test_old_module_paths_warn_and_give_the_moved_module(old, new):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"assert old is importlib.import_module({new!r})\n"
        "assert any(w.category is DeprecationWarning and "
        f"{new!r} in str(w.message) for w in caught), caught\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
