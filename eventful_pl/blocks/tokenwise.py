"""The token-wise eventful block (:class:`TokenwiseEventfulBlock`, variant ``"tokenwise"``).

A gate and a buffer around each token-wise part (``qkv``, ``proj``, the MLP):
only the updated tokens go through the linear layers; attention is recomputed
densely from the buffered qkv (:meth:`TokenwiseEventfulBlock.eventful_attention`,
which the query-key and full variants override).
"""

from __future__ import annotations

from torch import Tensor

from eventful_pl.blocks.dense import Block, BlockVariant
from eventful_pl.gates import STGTGate, TokenBuffer, TokenGate
from eventful_pl.policies import TokenPolicy


class TokenwiseEventfulBlock(Block):
    """Gate + buffer around ``qkv``, ``proj`` and the MLP (eventful variant 1).

    Args:
        policy: Token selection policy shared by the block's gates.
        gate_before_ln: Put the qkv and MLP gates before their LayerNorm.
        stgt: Use the STGT gate (reference = previous frame) instead.
        **block_kwargs: See :class:`Block` (no ``ats_fraction``).
    """

    variant: BlockVariant = "tokenwise"

    def __init__(
        self,
        dim: int,
        heads: int,
        policy: TokenPolicy | None = None,
        gate_before_ln: bool = False,
        stgt: bool = False,
        **block_kwargs,
    ) -> None:
        if block_kwargs.get("ats_fraction") is not None:
            raise ValueError("ats_fraction is only supported by the dense block variant")
        super().__init__(dim, heads, **block_kwargs)
        self.gate_before_ln = gate_before_ln
        self.stgt = stgt
        gate_class = STGTGate if stgt else TokenGate
        self.qkv_gate = gate_class(policy)
        self.qkv_buffer = TokenBuffer()
        self.proj_gate = gate_class(policy)
        self.proj_buffer = TokenBuffer()
        self.mlp_gate = gate_class(policy)
        self.mlp_buffer = TokenBuffer()

    @property
    def policy(self) -> TokenPolicy | None:
        return self.qkv_gate.policy

    @policy.setter
    def policy(self, policy: TokenPolicy | None) -> None:
        for gate in (self.qkv_gate, self.proj_gate, self.mlp_gate):
            gate.policy = policy

    def forward(self, x: Tensor, owns_input: bool = False) -> Tensor:
        self.check_tokens(x)
        if self.gate_before_ln:
            h, index = self.qkv_gate(x)
            h = self.norm1(h)
        else:
            h, index = self.qkv_gate(x, norm=self.norm1)
        y = self.attention_branch(self.linear(self.qkv, h), index)

        h, index = self.proj_gate(y)
        x = self.add(x, self.proj_buffer(self.linear(self.proj, h), index), inplace=owns_input)

        if self.gate_before_ln:
            h, index = self.mlp_gate(x)
            h = self.norm2(h)
        else:
            h, index = self.mlp_gate(x, norm=self.norm2)
        # x is this call's own tensor (the first residual made it): add in place.
        return self.add(x, self.mlp_buffer(self.mlp(h), index), inplace=True)

    def attention_branch(self, qkv: Tensor, index: Tensor | None) -> Tensor:
        """qkv of the gated tokens (B, k, 3D) and their index -> attention
        (B, N, D), or its heads (B, N, H, d) for the projection gate to read.

        Buffers the qkv of every token, then attends over the buffer.
        """
        return self.eventful_attention(self.qkv_buffer(qkv, index), index)

    def eventful_attention(self, qkv: Tensor, index: Tensor | None) -> Tensor:
        """Attention over the buffered qkv (B, N, 3D) -> (B, N, D); dense here."""
        return self.attend(qkv)[0]
