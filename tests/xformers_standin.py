"""A plain-PyTorch stand-in for the three xformers pieces mistral_inference imports.

mistral_inference calls xformers' `memory_efficient_attention`, whose kernels only run on CUDA. On a
CPU the export test installs this module as `xformers.ops.fmha` instead: the same attention (softmax
of q.k^T / sqrt(d) under the same block-diagonal, causal and local masks), materialised densely.
Only the masks mistral_inference builds for a first prefill and for the vision encoder are needed.
"""

from __future__ import annotations

import sys
import types

import torch


class AttentionBias:
    def materialize(self, q_len: int, kv_len: int) -> torch.Tensor:
        raise NotImplementedError


class _BlockDiagonal(AttentionBias):
    def __init__(self, q_seqlen, kv_seqlen=None, causal=False, window=None):
        self.q_seqlen = list(q_seqlen)
        self.kv_seqlen = list(kv_seqlen) if kv_seqlen is not None else list(q_seqlen)
        self.causal = causal
        self.window = window

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, **_):
        return cls(q_seqlen, kv_seqlen)

    def make_local_attention(self, window):
        return type(self)(self.q_seqlen, self.kv_seqlen, self.causal, window)

    def materialize(self, q_len, kv_len):
        allowed = torch.zeros(q_len, kv_len, dtype=torch.bool)
        q0 = k0 = 0
        for q, k in zip(self.q_seqlen, self.kv_seqlen, strict=True):
            block = torch.ones(q, k, dtype=torch.bool)
            if self.causal:  # query i sees keys up to its own position, aligned at the start
                block = torch.tril(block)
                if self.window is not None:
                    block &= torch.triu(torch.ones(q, k, dtype=torch.bool), diagonal=-(self.window - 1))
            allowed[q0 : q0 + q, k0 : k0 + k] = block
            q0, k0 = q0 + q, k0 + k
        return allowed


class BlockDiagonalMask(_BlockDiagonal):
    def make_local_attention_from_bottomright(self, window):
        raise NotImplementedError("subsequent prefill is not needed by the export test")


class BlockDiagonalCausalMask(_BlockDiagonal):
    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, **_):
        return cls(q_seqlen, kv_seqlen, causal=True)


class BlockDiagonalCausalWithOffsetPaddedKeysMask(_BlockDiagonal):
    @classmethod
    def from_seqlens(cls, q_seqlen, kv_padding=None, kv_seqlen=None):
        raise NotImplementedError("decoding is not needed by the export test")


def memory_efficient_attention(q, k, v, attn_bias=None):
    """(1, S, H, D) tensors, like xformers; dense softmax attention under the mask."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    if attn_bias is not None:
        allowed = attn_bias.materialize(q.shape[1], k.shape[1]).to(scores.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype).contiguous()


def install() -> None:
    """Make `import xformers.ops.fmha[.attn_bias]` resolve to this stand-in."""
    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    for cls in (
        AttentionBias,
        BlockDiagonalMask,
        BlockDiagonalCausalMask,
        BlockDiagonalCausalWithOffsetPaddedKeysMask,
    ):
        setattr(attn_bias, cls.__name__, cls)
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.memory_efficient_attention = memory_efficient_attention
    fmha.attn_bias = attn_bias
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    ops.memory_efficient_attention = memory_efficient_attention
    root = types.ModuleType("xformers")
    root.ops = ops
    sys.modules.update(
        {
            "xformers": root,
            "xformers.ops": ops,
            "xformers.ops.fmha": fmha,
            "xformers.ops.fmha.attn_bias": attn_bias,
        }
    )
