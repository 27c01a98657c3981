"""The key-blocked Triton kernels (joint key sets, issue 21) under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported: :func:`test_joint_interpreter_suite`
runs this file again in a child pytest process with it set (in a plain run the cases skip with
that reason). Run the child directly with ``TRITON_INTERPRET=1 pytest tests/test_triton_joint_interp.py``.

Every case: fresh random inputs in diffusers' transposed layouts, allocations poisoned with NaN,
out / maps / loss and every gradient against the float64 reference (``semfid.testing``) with
flash-attention's rule (2x plain PyTorch's error at the dtype, 3x for gradients). Layouts: SD3's
joint keys [image, text] and Flux's [text, image] (maps of the image queries over the text
columns, the reference replacing the text segment by a text of another length), PixArt-like
cross-attention (300 keys, head dim 72), -inf / -10000 masks with fully masked rows, ragged
tokens. Shapes stay small (<= 130 queries, <= 300 keys): the interpreter costs ~ms per op.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_triton_interp as base  # noqa: E402  (module import: its tests are not collected here)
from semfid.testing import attention_ref, subject_ref  # noqa: E402

import semfid  # noqa: E402

inner_only = base.inner_only
EXPECTED_CHILD_CASES = 10  # 3 cross-attention + maps-only + 4 subject + determinism + routing


@pytest.mark.slow
@pytest.mark.skipif(base.INNER, reason="this is the child process")
@pytest.mark.skipif(not base.HAS_TRITON, reason="triton is not installed (pip install triton)")
def test_joint_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=1200)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"joint interpreter suite failed:\n{tail}"
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= EXPECTED_CHILD_CASES and " failed" not in res.stdout, tail


@dataclass
class Layout:
    """A joint block: queries and keys [first, second] (``text_first``: Flux's [text, image], else
    SD3's [image, text]); maps over the image queries and the text columns; k_ref replaces the
    text keys with ``ref_text`` keys. ``text_first=None``: plain cross-attention (PixArt), keys
    are all text, maps over every query."""
    image: int
    text: int
    ref_text: int
    D: int
    text_first: Optional[bool]
    H: int = 2
    B: int = 1

    @property
    def N(self) -> int:
        return self.image + (self.text if self.text_first is not None else 0)

    @property
    def M(self) -> int:
        return self.text + (self.image if self.text_first is not None else 0)

    def text_keys(self) -> Tuple[int, int]:
        if self.text_first is None or self.text_first:
            return 0, self.text
        return self.image, self.image + self.text

    def image_queries(self) -> Tuple[int, int]:
        if self.text_first:
            return self.text, self.text + self.image
        return 0, self.image

    def __str__(self):
        kind = {None: "xattn", True: "flux", False: "sd3"}[self.text_first]
        return f"{kind}-B{self.B}H{self.H}img{self.image}txt{self.text}ref{self.ref_text}D{self.D}"


def make(layout: Layout, dtype, seed: int, mask: Optional[str], S: int):
    g = torch.Generator().manual_seed(seed)

    def rand(n, d):  # [B, n, H, d] memory seen as [B, H, n, d]: diffusers' layout
        return torch.randn(layout.B, n, layout.H, d, generator=g).to(dtype).transpose(1, 2).requires_grad_()

    q, k, v = rand(layout.N, layout.D), rand(layout.M, layout.D), rand(layout.M, layout.D)
    k_ref = rand(layout.ref_text, layout.D)
    t0, t1 = layout.text_keys()
    tokens = (t0 + torch.randint(0, layout.text, (layout.B, S), generator=g))
    tokens[:, -1] = tokens[:, 0]  # a duplicate
    ref_tokens = t0 + torch.randint(0, max(layout.ref_text, 1), (layout.B, S), generator=g)
    bias = ref_bias = None
    if mask is not None:
        fill = float(mask)
        bias, ref_bias = torch.zeros(layout.B, 1, layout.M), torch.zeros(layout.B, 1, layout.ref_text)
        bias[0, 0, t1 - 3:t1] = fill  # the text's padding keys
        ref_bias[0, 0, layout.ref_text - 2:] = fill
        if layout.text_first is None:
            bias[-1, 0, :] = fill  # cross-attention: every key of the last item masked
    return q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens


XATTN = [  # (layout, dtype, head_reduce, mask)
    (Layout(64, 33, 0, 64, text_first=False), torch.float16, "mean", None),
    (Layout(100, 20, 0, 72, text_first=True), torch.bfloat16, "none", "-inf"),
    (Layout(40, 300, 0, 72, text_first=None, B=2), torch.float32, "none", "-inf"),
]


@inner_only
@pytest.mark.parametrize("layout,dtype,head_reduce,mask", XATTN, ids=lambda x: str(x).replace("torch.", ""))
def test_joint_cross_attention(layout, dtype, head_reduce, mask):
    # 300-key cross-attention with 40 columns: the map gradient is scattered in two 32-column chunks
    S = 40 if layout.text_first is None else 3
    q, k, v, _, bias, _, select, _ = make(layout, dtype, zlib.crc32(str(layout).encode()), mask, S=S)
    rows = layout.image_queries()
    kw = dict(attn_bias=bias, select=select, head_reduce=head_reduce, map_queries=rows)
    with base.poisoned_allocations():
        out, maps = semfid.cross_attention(q, k, v, backend="triton", **kw)
    ref, plain = attention_ref(q, k, v, **kw), attention_ref(q, k, v, upcast=False, **kw)
    assert out.dtype == dtype and maps.shape == ref[1].shape
    assert not out.isnan().any() and not maps.isnan().any(), "unwritten (poisoned) elements"
    base.check_all(("out", "maps"), (out, maps), ref, plain, dtype)
    w_out, w_maps = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    with base.poisoned_allocations():
        got = base.grads_of((out, maps), (w_out, w_maps), (q, k, v))
    for gr, t in zip(got, (q, k, v)):
        assert not gr.isnan().any() and gr.stride() == t.stride()
    expected = base.grads_of(ref, (w_out, w_maps), (q, k, v))
    plain_g = base.grads_of(plain, (w_out, w_maps), (q, k, v))
    for label, a, r, p in zip(("dq", "dk", "dv"), got, expected, plain_g):
        base.assert_close_rule(label, a, r, p, factor=3.0, atol=base.ulp_atol(dtype, float(r.abs().max()) + 1e-3))
    if layout.text_first is None and mask == "-inf":  # the last item's rows are fully masked
        assert torch.all(out[-1] == 0) and torch.all(got[0][-1] == 0)


@inner_only
def test_joint_maps_only_pass():
    layout = Layout(60, 25, 0, 64, text_first=False)
    q, k, v, _, bias, _, select, _ = make(layout, torch.float32, 7, "-10000", S=2)
    rows = layout.image_queries()
    maps = semfid.attention_maps(q, k, select=select, attn_bias=bias, map_queries=rows, backend="triton")
    ref = attention_ref(q, k, None, select=select, attn_bias=bias, map_queries=rows)[1]
    torch.testing.assert_close(maps, ref.float(), atol=1e-6, rtol=1e-5)
    w = torch.randn_like(ref)
    dq, dk = torch.autograd.grad((maps * w).sum(), (q, k))
    rq, rk = torch.autograd.grad((ref * w).sum(), (q, k))
    torch.testing.assert_close(dq, rq.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dk, rk.float(), atol=1e-5, rtol=1e-4)


SUBJECT = [  # (layout, dtype, head_reduce, detach_reference, mask, ragged)
    (Layout(64, 33, 21, 64, text_first=False), torch.float16, "mean", True, None, False),
    (Layout(64, 20, 29, 72, text_first=True), torch.bfloat16, "none", False, "-inf", False),
    (Layout(50, 40, 17, 72, text_first=True, B=2), torch.float32, "mean", False, "-10000", True),
    # 270 keys with the default segment (the UNet meaning), 32 tokens (the most the backend takes
    # for the subject op on these kernels): the backward prep walks them in two 16-column chunks.
    (Layout(30, 270, 9, 64, text_first=None), torch.float16, "none", True, "-inf", False),
]


@inner_only
@pytest.mark.parametrize("layout,dtype,head_reduce,detach,mask,ragged", SUBJECT,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_joint_subject_attention(layout, dtype, head_reduce, detach, mask, ragged):
    q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens = make(
        layout, dtype, zlib.crc32(f"{layout}{detach}".encode()), mask, S=4 if layout.text_first is not None else 32)
    tokens, ref_tokens = tokens.tolist(), ref_tokens.tolist()
    if ragged:  # row 0 keeps its 4 tokens, the others 3 (loss weights 0 on the padding)
        tokens = [tokens[0]] + [r[:-1] for r in tokens[1:]]
        ref_tokens = [ref_tokens[0]] + [r[:-1] for r in ref_tokens[1:]]
    joint = layout.text_first is not None
    kw = dict(tokens=tokens, ref_tokens=ref_tokens, attn_bias=bias, ref_attn_bias=ref_bias,
              head_reduce=head_reduce, detach_reference=detach, return_maps=True,
              map_queries=layout.image_queries() if joint else None,
              ref_segment=layout.text_keys() if joint else None)
    with base.poisoned_allocations():
        got = semfid.subject_attention(q, k, v, k_ref, backend="triton", **kw)
    ref, plain = subject_ref(q, k, v, k_ref, **kw), subject_ref(q, k, v, k_ref, upcast=False, **kw)
    for name, t in zip(("out", "loss", "maps"), got):
        assert not t.isnan().any(), f"{name}: unwritten (poisoned) elements"
    base.check_all(("out",), got[:1], ref[:1], plain[:1], dtype)
    base.check_all(("loss", "maps"), got[1:], ref[1:], plain[1:], dtype)

    inputs = (q, k, v) if detach else (q, k, v, k_ref)
    w_out, w_maps = torch.randn_like(ref[0]), torch.randn_like(ref[2])

    def objective(outs):
        return (outs[0].float() * w_out).sum() + 100.0 * outs[1].float().sum() + (outs[2].float() * w_maps).sum()

    with base.poisoned_allocations():
        grads = torch.autograd.grad(objective(got), inputs)
    ref_g = torch.autograd.grad(objective(ref), inputs)
    plain_g = torch.autograd.grad(objective(plain), inputs)
    for label, a, r, p, t in zip(("dq", "dk", "dv", "dk_ref"), grads, ref_g, plain_g, inputs):
        assert not a.isnan().any(), f"{label}: unwritten (poisoned) elements"
        assert a.stride() == t.stride() and a.dtype == t.dtype
        base.assert_close_rule(label, a, r, p, factor=3.0, atol=base.ulp_atol(dtype, float(r.abs().max()) + 1e-3))


@inner_only
def test_joint_backward_is_bitwise_deterministic():
    from semfid import kernels

    layout = Layout(64, 20, 13, 64, text_first=True)
    q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in make(layout, torch.float16, 5, "-inf", S=3))
    rows, seg = layout.image_queries(), layout.text_keys()
    bias, ref_bias = bias.expand(1, 2, -1), ref_bias.expand(1, 2, -1)
    fwd = kernels.joint_subject_fwd(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, None, 0.2, True, False,
                                    False, *rows, *seg)
    out, lse, lse_ref, loss, _, diff = fwd
    dout, dloss = torch.randn_like(out), torch.ones_like(loss)
    args = (q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, None, 0.2, True, False, *rows, *seg, out, lse,
            lse_ref, diff, dout, dloss, None)
    first = kernels.joint_subject_bwd(*args)
    again = kernels.joint_subject_bwd(*args)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert torch.all(lse_ref[..., :rows[0]] == float("inf")), "no reference outside the map rows"


@inner_only
def test_routing_and_refusals():
    """300 keys run the key-blocked kernels; their head-dim limit is a reason naming it; an empty
    map range gives a NaN loss and zero map gradients, as the float64 reference defines it."""
    q, k, v = torch.randn(1, 2, 5, 160), torch.randn(1, 2, 300, 160), torch.randn(1, 2, 300, 160)
    with pytest.raises(ValueError, match=r"head_dim=160 > 128 with num_keys > 256"):
        semfid.cross_attention(q, k, v, backend="triton")
    torch.testing.assert_close(semfid.cross_attention(q, k, v, backend="auto"), attention_ref(q, k, v).float(),
                               atol=1e-5, rtol=1e-5)
    layout = Layout(8, 5, 4, 16, text_first=False)
    q, k, v, k_ref, _, _, tokens, ref_tokens = make(layout, torch.float32, 3, None, S=2)
    many = torch.zeros(1, 33, dtype=torch.long) + layout.text_keys()[0]
    with pytest.raises(ValueError, match=r"num_selected=33 > 32 tokens"):
        semfid.subject_attention(q, k, v, k_ref, tokens=many, map_queries=(0, 8), ref_segment=layout.text_keys(),
                                 backend="triton")
    out, loss = semfid.subject_attention(q, k, v, k_ref, tokens=tokens, ref_tokens=ref_tokens, map_queries=(3, 3),
                                         ref_segment=layout.text_keys(), backend="triton")
    assert loss.isnan().all()
    torch.testing.assert_close(out, attention_ref(q, k, v).float(), atol=1e-6, rtol=1e-5)
