"""GPU checks; skipped where no CUDA device is present (CI)."""

import pytest
import torch

from eventful_pl.policies import TopRPolicy
from tests.helpers import DIM, make_backbones, video_stream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("variant", ["tokenwise", "query_key", "full"])
def test_cuda_r_equals_n_matches_dense(variant):
    dense, eventful = make_backbones(variant, dim=DIM, depth=2, heads=4, input_size=6)
    dense, eventful = dense.cuda(), eventful.cuda()
    eventful.set_policy(TopRPolicy(36))
    with torch.no_grad():
        for frame in video_stream(4, 3, 36, DIM):
            frame = frame.cuda()
            torch.testing.assert_close(eventful(frame), dense(frame), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cast", ["float16", "bfloat16"])
def test_cuda_half_precision_av(cast):
    dense, eventful = make_backbones(
        "full", dim=DIM, depth=2, heads=4, input_size=6, matmul_2_cast=cast
    )
    dense, eventful = dense.cuda(), eventful.cuda()
    eventful.set_policy(TopRPolicy(36))
    with torch.no_grad():
        for frame in video_stream(4, 2, 36, DIM):
            frame = frame.cuda()
            torch.testing.assert_close(eventful(frame), dense(frame), rtol=2e-2, atol=2e-2)
