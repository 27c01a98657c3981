"""semfid.losses on maps captured by semfid, against the same losses written out directly on the
maps of the explicit-softmax reference processor (float64, SD1.5 / SDXL twins), values and
gradients, with gradient checkpointing off and on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semfid import losses
from semfid.diffusers import install

from test_processors import M, TWINS, assert_close, make_call, ref_pair, run, text_width

TOKENS = [1, 2, 4, 5, 9]  # captured columns; the losses use some of them
SUBJECT = [1, 3]  # columns (into TOKENS) with a mask each


def _grid(n):
    side = int(round(n ** 0.5))
    return side, side


def _resized(masks, grid):
    shrink = grid[0] < masks.shape[-2]
    return F.interpolate(masks, size=grid, mode="bilinear", align_corners=False, antialias=shrink)


# direct implementations: loops over layers, rows and tokens, on the reference maps ---------------
def direct_mask_mse(maps, masks):
    per_layer = []
    for a in maps.values():
        a = a.mean(1) if a.dim() == 4 else a
        m = _resized(masks, _grid(a.shape[1]))
        rows = []
        for b in range(a.shape[0]):
            terms = []
            for k, col in enumerate(SUBJECT):
                x = a[b, :, col] / a[b, :, col].max()
                terms.append(((x - m[b, k].flatten()) ** 2).mean())
            rows.append(torch.stack(terms).mean())
        per_layer.append(torch.stack(rows))
    return torch.stack(per_layer).mean(0)


def direct_balanced_l1(maps, masks):
    per_layer = []
    for a in maps.values():
        per_head = a if a.dim() == 4 else a[:, None]
        m = _resized(masks, _grid(a.shape[-2]))
        rows = []
        for b in range(a.shape[0]):
            terms = []
            for h in range(per_head.shape[1]):
                for k, col in enumerate(SUBJECT):
                    x, obj = per_head[b, h, :, col], m[b, k].flatten()
                    terms.append((x * (1 - obj)).sum() / (1 - obj).sum() - (x * obj).sum() / obj.sum())
            rows.append(torch.stack(terms).mean())
        per_layer.append(torch.stack(rows))
    return torch.stack(per_layer).mean(0)


def direct_attend_and_excite(maps, res, text):
    chosen = [a.mean(1) if a.dim() == 4 else a for a in maps.values() if _grid(a.shape[-2]) == (res, res)]
    agg = torch.stack(chosen).mean(0)  # [B, N, S]
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=agg.dtype) / (2 * 0.5 ** 2))
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()
    out = []
    for b in range(agg.shape[0]):
        probs = torch.softmax(100.0 * agg[b][:, text], dim=-1)  # [N, T]: over the prompt's words
        worst = []
        for col in SUBJECT:
            img = probs[:, text.index(col)].reshape(res, res)
            padded = F.pad(img[None, None], (1, 1, 1, 1), mode="reflect")[0, 0]
            smooth = torch.stack([torch.stack([(padded[i:i + 3, j:j + 3] * kernel).sum() for j in range(res)])
                                  for i in range(res)])
            worst.append(torch.clamp(1 - smooth.max(), min=0))
        out.append(torch.stack(worst).max())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,head_reduce", [("sd15", "mean"), ("sd15", "none"), ("sdxl", "mean")])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_losses_match_direct_implementation(kind, checkpointing, head_reduce):
    unet, ref, state = ref_pair(kind)
    sample, t, kw = make_call(unet, dtype=torch.float64)
    ehs = kw["encoder_hidden_states"]
    masks = (torch.rand(2, len(SUBJECT), 32, 32, dtype=torch.float64) > 0.6).double()
    text = [0, 1, 2, 3]  # TOKENS[1:] stand for the prompt's words
    res = 8 if kind == "sd15" else 4

    def grads(loss, leaf):
        return torch.autograd.grad(loss.sum(), leaf, retain_graph=True)[0]

    leaf_ref = ehs.clone().requires_grad_(True)
    state.tokens, state.head_reduce = torch.tensor(TOKENS), head_reduce
    run(ref, sample, t, kw, encoder_hidden_states=leaf_ref)
    want = {"mse": direct_mask_mse(state.maps, masks), "l1": direct_balanced_l1(state.maps, masks),
            "ae": direct_attend_and_excite(state.maps, res, text)}

    if checkpointing:
        unet.enable_gradient_checkpointing()
    ctl = install(unet)
    leaf = ehs.clone().requires_grad_(True)
    with ctl.capture(TOKENS, head_reduce=head_reduce) as rec:
        run(unet, sample, t, kw, encoder_hidden_states=leaf)
    got = {"mse": losses.mask_mse_loss(rec, masks, SUBJECT), "l1": losses.balanced_l1_loss(rec, masks, SUBJECT),
           "ae": losses.max_attention_loss(rec, SUBJECT, text=text, res=res)}
    for key in want:
        assert got[key].shape == (2,)
        assert_close(got[key], want[key], 1e-9, key)
        assert_close(grads(got[key], leaf), grads(want[key], leaf_ref), 1e-8, f"d ehs ({key})")


def test_losses_on_subject_loss_maps_of_the_same_pass():
    """keep_maps=True: the fused subject-loss pass also returns the target maps the losses need."""
    unet, _, _ = ref_pair("sd15")
    sample, t, kw = make_call(unet, dtype=torch.float64)
    masks = torch.rand(2, len(SUBJECT), 16, 16, dtype=torch.float64)
    refs = torch.randn(1, M, text_width(unet), dtype=torch.float64)
    ctl = install(unet)
    with ctl.capture(TOKENS) as cap:
        run(unet, sample, t, kw)
    with ctl.subject_loss(refs, TOKENS, keep_maps=True) as rec:
        run(unet, sample, t, kw)
    assert list(rec.maps) == list(cap.maps) and rec.loss.shape == (2,)
    for fn in (losses.mask_mse_loss, losses.balanced_l1_loss):
        assert_close(fn(rec, masks, SUBJECT), fn(cap, masks, SUBJECT), 1e-12, fn.__name__)


def test_bad_input_names_the_argument():
    unet, _, _ = ref_pair("sd15", torch.float32)
    sample, t, kw = make_call(unet)
    ctl = install(unet)
    with torch.no_grad(), ctl.capture([1, 2]) as rec:
        run(unet, sample, t, kw)
    with pytest.raises(ValueError, match=r"masks must have batch 2 and one mask per selected column \(1\)"):
        losses.mask_mse_loss(rec, torch.ones(2, 2, 8, 8), [0])
    with pytest.raises(ValueError, match=r"columns must be non-empty column indices in \[0, 2\)"):
        losses.balanced_l1_loss(rec, torch.ones(2, 8, 8), [5])
    with pytest.raises(ValueError, match=r"subject columns \[1\] are not among the text columns"):
        losses.max_attention_loss(rec, [1], text=[0], res=8)
