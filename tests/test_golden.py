"""Golden vectors computed with the original authors' code (``tests/data/``).

Each case drives one block through T frames of one stream through the
``eventful_pl.compat.reference_block`` door; outputs must match within 1e-4
relative error per frame and the operation counts exactly.
"""

from pathlib import Path

import pytest
import torch

from eventful_pl.compat import reference_block

# Each test runs in each autograd mode; the fixture enters it (bodies do not).
pytestmark = pytest.mark.usefixtures("grad_mode")

DATA = Path(__file__).parent / "data"
GOLDEN_FILES = [
    "global_classtoken.pt",
    "global_threshold.pt",
    "window_relpos_padded.pt",
    "global_relpos_pooled.pt",
]


def _cases():
    for file in GOLDEN_FILES:
        golden = torch.load(DATA / file, weights_only=True)
        for name in golden["cases"]:
            yield pytest.param(file, name, id=f"{file[:-3]}-{name}")


@pytest.fixture(scope="module")
def golden_data():
    return {file: torch.load(DATA / file, weights_only=True) for file in GOLDEN_FILES}


@pytest.mark.parametrize(("file", "case_name"), list(_cases()))
def test_golden_case(golden_data, file, case_name):
    golden = golden_data[file]
    case = golden["cases"][case_name]
    block = reference_block(
        case["block_class"], case["block_kwargs"], case["policy"], golden["weights"]
    )
    block.reset()
    frames = golden["frames"]
    assert frames.shape[0] >= 2
    for t in range(frames.shape[0]):
        out = block(frames[t])
        ref = case["outputs"][t]
        assert out.shape == ref.shape
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, f"frame {t}: relative error {rel:.2e}"
        expected = {k: v for k, v in case["counts"][t].items() if v}
        assert block.last_counts() == expected, f"frame {t} counts"


def test_golden_reset_replays_the_stream(golden_data):
    """A reset makes the next frame a flush: replaying the stream gives the same outputs."""
    golden = golden_data["global_classtoken.pt"]
    case = golden["cases"]["eventful_r16"]
    block = reference_block(
        case["block_class"], case["block_kwargs"], case["policy"], golden["weights"]
    )
    for _ in range(2):
        block.reset()
        for t in range(3):
            out = block(golden["frames"][t])
            torch.testing.assert_close(out, case["outputs"][t], rtol=1e-4, atol=1e-5)
