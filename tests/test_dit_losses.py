"""The subject-wise loss on the DiT twins against an explicit float64 softmax: SD3.5 medium and Flux
(joint blocks, reference keys from a forward with the reference prompt; both Flux block kinds) and
PixArt-Σ (attn2, reference keys = to_k(reference states)); checkpointing on and off; bad input."""

from __future__ import annotations

import pytest
import torch

from semfid.diffusers import install

from _dit_calls import make_call, twin
from test_dit_capture import _stock_qk

TOKENS, REF_TOKENS = [1, 3], [0, 2]


def _explicit_loss(family, q, k_t, k_ref, n_img, text_len):
    """Per-layer loss [B] from explicit float64 softmaxes (head mean, image queries)."""
    s = q.shape[-1] ** -0.5
    q, k_t, k_ref = q.double(), k_t.double(), k_ref.double()
    if family == "sd3":  # keys [image, text]
        rows, k_r, cols, ref_cols = slice(0, n_img), torch.cat([k_t[:, :, :n_img], k_ref], 2), n_img, n_img
    elif family == "flux":  # keys [text, image]
        rows, k_r, cols, ref_cols = slice(text_len, None), torch.cat([k_ref, k_t[:, :, text_len:]], 2), 0, 0
    else:
        rows, k_r, cols, ref_cols = slice(None), k_ref, 0, 0
    a_t = torch.softmax(q @ k_t.transpose(-1, -2) * s, -1)[:, :, rows][..., [cols + t for t in TOKENS]]
    a_r = torch.softmax(q @ k_r.transpose(-1, -2) * s, -1)[:, :, rows][..., [ref_cols + t for t in REF_TOKENS]]
    return (a_t.mean(1) - a_r.mean(1)).square().mean(dim=(1, 2))


def _reference_keys(family, model, kw, ref_states, text_len):
    """Each layer's reference keys [B, H, M_ref, D], computed without semfid."""
    if family == "pixart":
        keys = {}
        for name, m in model.named_modules():
            if getattr(m, "is_cross_attention", False):
                k = m.to_k(ref_states)
                keys[name] = k.view(1, -1, m.heads, k.shape[-1] // m.heads).transpose(1, 2).expand(2, -1, -1, -1)
        return keys
    ref_kw = dict(kw, encoder_hidden_states=ref_states.expand(2, -1, -1))
    if family == "flux":
        ref_kw["txt_ids"] = torch.zeros(ref_states.shape[1], 3)
    _, qk = _stock_qk(model, ref_kw)
    m_ref = ref_states.shape[1]
    return {n: (k[:, :, -m_ref:] if family == "sd3" else k[:, :, :m_ref]) for n, (_, k) in qk.items()
            if k.shape[2] > 6 * 4}  # joint layers only (SD3.5 medium's attn2 sees the 24 image keys)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux", "pixart"])
def test_subject_loss_matches_explicit_softmax_with_and_without_checkpointing(family):
    torch.manual_seed(0)
    model = twin(family)
    kw = make_call(family, batch=2, text=5, h=4, w=6)
    width = 16 if family == "pixart" else 32  # PixArt: attn2 input (after caption_projection)
    ref_states = torch.randn(1, 4, width)
    with torch.no_grad():
        _, qk = _stock_qk(model, kw)
        k_refs = _reference_keys(family, model, kw, ref_states, 5)
    # a few layers of each kind keep the test fast (every layer is captured in test_dit_capture)
    chosen = [n for n in k_refs if n.split(".")[1] in ("0", "1")]
    ctl = install(model, layers=chosen)
    results = []
    for checkpointing in (False, True):
        model.train()  # dropout is 0 in every twin; checkpointing runs in training mode
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        with ctl.subject_loss(ref_states, TOKENS, ref_tokens=REF_TOKENS, keep_maps=True) as rec:
            out = model(**kw).sample
        (out.square().mean() + rec.loss.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((rec.loss.detach(), dict(rec.layer_losses), grads, {n: m.detach() for n, m in rec.maps.items()}))
    assert set(results[0][1]) == set(chosen) and len(chosen) == (4 if family == "flux" else 2)
    for name, layer_loss in results[0][1].items():
        q, k = qk[name]
        want = _explicit_loss(family, q, k, k_refs[name], n_img=24, text_len=5)
        assert torch.allclose(layer_loss.double(), want, rtol=1e-4, atol=1e-9), name
    (l0, _, g0, m0), (l1, _, g1, m1) = results
    assert torch.equal(l0, l1)
    assert all(m0[n].shape == (2, 24, 2) and torch.equal(m0[n], m1[n]) for n in m0)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1))
    ctl.uninstall()


def test_joint_subject_loss_bad_input_names_the_argument():
    model = twin("flux")
    kw = make_call("flux", batch=1, text=5, h=2, w=3)
    ctl = install(model)
    with torch.no_grad():
        with pytest.raises(ValueError, match="ref_tokens.*4 text tokens of reference_states"):
            with ctl.subject_loss(torch.randn(1, 4, 32), [1], ref_tokens=[4]):
                model(**kw)
        with pytest.raises(ValueError, match="tokens must index the 5 text tokens"):
            with ctl.subject_loss(torch.randn(1, 4, 32), [5], ref_tokens=[1]):
                model(**kw)
        with pytest.raises(ValueError, match="reference_states must have width C=32"):
            with ctl.subject_loss(torch.randn(1, 4, 16), [1]):
                model(**kw)
        name = ctl.layers[0]
        with pytest.raises(ValueError, match="reference_states must be one tensor"):
            with ctl.subject_loss({n: torch.randn(1, 4, 32) for n in ctl.layers}, [1]):
                model(**kw)
        with pytest.raises(ValueError, match=f"layer {name}: value_states"):
            with ctl.values(torch.randn(1, 5, 32)):
                with ctl.capture([1]):
                    model(**kw)
