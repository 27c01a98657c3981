"""Bad input raises ValueError / TypeError / IndexError naming the argument and what was expected."""

from __future__ import annotations

import re

import pytest
import torch

import semfid


def _qkv(B=2, H=3, N=5, M=7, D=8, dtype=torch.float32):
    return (torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, H, M, D, dtype=dtype),
            torch.randn(B, H, M, D, dtype=dtype))


def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank(which):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args[which] = args[which][0]
    _raises(ValueError, rf"^{which} must have 4 dims.*got shape", semfid.cross_attention,
            args["q"], args["k"], args["v"])


def test_not_a_tensor_and_none_values():
    q, k, v = _qkv()
    _raises(TypeError, r"^q must be a torch.Tensor", semfid.cross_attention, q.tolist(), k, v)
    _raises(TypeError, r"^v must be a torch.Tensor", semfid.cross_attention, q, k, None)


def test_mismatched_batch_heads_dims():
    q, k, v = _qkv()
    _raises(ValueError, r"^k must have batch 2 and 3 heads", semfid.cross_attention, q, k[:1], v[:1])
    _raises(ValueError, r"^k must have batch 2 and 3 heads", semfid.cross_attention, q, k[:, :2], v[:, :2])
    _raises(ValueError, r"^k must have head dim 8", semfid.cross_attention, q, k[..., :4], v)
    _raises(ValueError, r"^v must be \[B, H, M, Dv\]", semfid.cross_attention, q, k, v[:, :, :3])


def test_mismatched_dtype_and_unsupported_dtype():
    q, k, v = _qkv()
    _raises(TypeError, r"^k must have the dtype of q", semfid.cross_attention, q, k.half(), v)
    _raises(TypeError, r"^q must be float16, bfloat16, float32 or float64",
            semfid.cross_attention, q.int(), k, v)


def test_mismatched_device():
    q, k, v = _qkv()
    _raises(ValueError, r"^k must be on the device of q", semfid.cross_attention, q,
            k.to("meta"), v)


def test_select_errors():
    q, k, v = _qkv()
    _raises(TypeError, r"^select must hold integer key indices", semfid.cross_attention, q, k, v,
            select=torch.tensor([0.0, 1.0]))
    _raises(TypeError, r"^select must hold integer key indices", semfid.cross_attention, q, k, v,
            select=[0, 1.5])
    _raises(IndexError, r"^select indices must lie in \[0, 7\).*max 7", semfid.cross_attention,
            q, k, v, select=[0, 7])
    _raises(IndexError, r"^select indices must lie in \[0, 7\).*min -1", semfid.cross_attention,
            q, k, v, select=torch.tensor([-1, 2]))
    _raises(ValueError, r"^select must have one row per batch item \(\[B=2, S\]\)",
            semfid.cross_attention, q, k, v, select=torch.zeros(3, 2, dtype=torch.long))
    _raises(ValueError, r"^select must have shape \[S\] or \[B, S\]", semfid.cross_attention,
            q, k, v, select=torch.zeros(2, 1, 1, dtype=torch.long))
    _raises(ValueError, r"^select must select at least one key", semfid.cross_attention, q, k, v,
            select=[])
    _raises(TypeError, r"^select must be an int64 tensor", semfid.cross_attention, q, k, v,
            select="0,1")


def test_bias_errors():
    q, k, v = _qkv()
    _raises(ValueError, r"^attn_bias must not depend on the query", semfid.cross_attention,
            q, k, v, attn_bias=torch.zeros(2, 3, 5, 7))
    _raises(ValueError, r"^attn_bias must have shape \[B, M\]", semfid.cross_attention,
            q, k, v, attn_bias=torch.zeros(2, 6))
    _raises(TypeError, r"^attn_bias must be an additive float bias", semfid.cross_attention,
            q, k, v, attn_bias=torch.ones(2, 7, dtype=torch.bool))


def test_head_reduce_scale_backend_errors():
    q, k, v = _qkv()
    _raises(ValueError, r"^head_reduce must be one of \('mean', 'none'\), got 'sum'",
            semfid.cross_attention, q, k, v, select=[0], head_reduce="sum")
    _raises(TypeError, r"^scale must be a real number", semfid.cross_attention, q, k, v, scale="1")
    _raises(ValueError, r"^scale must be finite", semfid.cross_attention, q, k, v,
            scale=float("nan"))
    msg = _raises(ValueError, r"^backend must be 'auto' or one of", semfid.cross_attention,
                  q, k, v, backend="flash")
    assert "torch" in msg
    _raises(TypeError, r"^backend must be a string", semfid.cross_attention, q, k, v, backend=3)


def test_subject_attention_errors():
    q, k, v = _qkv()
    k_ref = torch.randn(2, 3, 9, 8)
    _raises(ValueError, r"^tokens must give the target-prompt token indices",
            semfid.subject_attention, q, k, v, k_ref, tokens=None)
    _raises(IndexError, r"^ref_tokens indices must lie in \[0, 9\)", semfid.subject_attention,
            q, k, v, k_ref, tokens=[1], ref_tokens=[9])
    _raises(IndexError, r"^tokens indices must lie in \[0, 7\)", semfid.subject_attention,
            q, k, v, k_ref, tokens=[8], ref_tokens=[1])
    _raises(ValueError, r"^ref_tokens must select as many tokens as tokens \(2\), got 1",
            semfid.subject_attention, q, k, v, k_ref, tokens=[1, 2], ref_tokens=[1])
    _raises(ValueError, r"^k_ref must have head dim 8", semfid.subject_attention, q, k, v,
            k_ref[..., :4], tokens=[1])
    _raises(ValueError, r"^ref_attn_bias must have shape", semfid.subject_attention, q, k, v,
            k_ref, tokens=[1], ref_attn_bias=torch.zeros(2, 7))
    _raises(TypeError, r"^detach_reference must be a bool", semfid.subject_attention, q, k, v,
            k_ref, tokens=[1], detach_reference="yes")
    _raises(TypeError, r"^return_maps must be a bool", semfid.subject_attention, q, k, v,
            k_ref, tokens=[1], return_maps=1)


def test_ragged_token_errors():
    q, k, v = _qkv()
    k_ref = torch.randn(2, 3, 9, 8)
    _raises(ValueError, r"^tokens: every row must select at least one key", semfid.subject_attention,
            q, k, v, k_ref, tokens=[[1, 2], []])
    _raises(ValueError, r"^tokens must have one row per batch item \(\[B=2, S\]\), got 3 rows",
            semfid.subject_attention, q, k, v, k_ref, tokens=[[1, 2], [3], [4]])
    _raises(ValueError, r"^ref_tokens must select as many tokens per row as tokens \(\[2, 1\]\), got \[1, 2\]",
            semfid.subject_attention, q, k, v, k_ref, tokens=[[1, 2], [3]], ref_tokens=[[1], [2, 3]])
    _raises(IndexError, r"^tokens indices must lie in \[0, 7\)", semfid.subject_attention,
            q, k, v, k_ref, tokens=[[1, 2], [7]])
    _raises(IndexError, r"^ref_tokens defaults to tokens, whose indices must then lie in \[0, 5\)",
            semfid.subject_attention, q, k, v, k_ref[:, :, :5], tokens=[[1, 2], [6]])
    _raises(TypeError, r"^tokens must hold integer key indices", semfid.subject_attention,
            q, k, v, k_ref, tokens=[[1, 2.0], [3]])
    _raises(ValueError, r"^select must be a flat list \[S\], a list of per-row lists", semfid.cross_attention,
            q, k, v, select=[1, [2, 3]])


def test_error_messages_show_shapes():
    q, k, v = _qkv()
    msg = _raises(ValueError, "k must have batch", semfid.cross_attention, q, k[:1], v[:1])
    assert re.search(r"q: shape=\(2, 3, 5, 8\)", msg) and re.search(r"k: shape=\(1, 3, 7, 8\)", msg)
