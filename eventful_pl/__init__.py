"""eventful-pl: Eventful Transformers (Dutson, Li, Gupta, ICCV 2023) for PyTorch Lightning."""

from eventful_pl.blocks import (
    BLOCK_VARIANTS,
    Block,
    EventfulBlock,
    QueryKeyEventfulBlock,
    TokenwiseEventfulBlock,
    build_block,
)
from eventful_pl.counting import OP_KINDS, OpCounter, attach_counter, count_ops
from eventful_pl.gates import DeltaGate, STGTGate, TokenBuffer, TokenGate
from eventful_pl.policies import (
    ThresholdPolicy,
    TokenPolicy,
    TopFractionPolicy,
    TopRPolicy,
    build_policy,
)
from eventful_pl.state import StreamState, reset_stream_state

__all__ = [
    "BLOCK_VARIANTS",
    "OP_KINDS",
    "Block",
    "DeltaGate",
    "EventfulBlock",
    "OpCounter",
    "QueryKeyEventfulBlock",
    "STGTGate",
    "StreamState",
    "ThresholdPolicy",
    "TokenBuffer",
    "TokenGate",
    "TokenPolicy",
    "TokenwiseEventfulBlock",
    "TopFractionPolicy",
    "TopRPolicy",
    "attach_counter",
    "build_block",
    "build_policy",
    "count_ops",
    "reset_stream_state",
]
