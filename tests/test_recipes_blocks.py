"""What the recipes rely on in the blocks: ragged prompts, accumulating recorders, loud errors, heatmap
grids. (The recipes themselves run in diffusers' real scripts: tests/test_recipes.py.)"""

from __future__ import annotations

import pytest
import torch

from semfid.diffusers import NoCallError, install

from test_processors import M, TWINS, assert_close, make_call, ref_pair, run, text_width


# ------------------------------------------------------------------------------------------------
# ragged rows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TWINS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_ragged_subject_loss_matches_reference(kind, checkpointing):
    unet, ref, state = ref_pair(kind)
    sample, t, kw = make_call(unet, dtype=torch.float64)
    ehs = kw["encoder_hidden_states"]
    refs = torch.randn(1, M, text_width(unet), dtype=torch.float64)
    tokens, ref_tokens = [[1, 4, 5, 9, 11], [2, 7]], [[1, 4, 6, 9, 12], [3, 7]]

    k_ref = ehs.clone().requires_grad_(True)
    state.tokens, state.ref_tokens, state.reference_states = tokens, ref_tokens, refs
    pred_ref = run(ref, sample, t, kw, encoder_hidden_states=k_ref)
    loss_ref = torch.stack(list(state.losses.values())).mean(0)
    (pred_ref.square().mean() + 10.0 * loss_ref.sum()).backward()

    if checkpointing:
        unet.enable_gradient_checkpointing()
    ctl = install(unet)
    k = ehs.clone().requires_grad_(True)
    with ctl.subject_loss(refs, tokens, ref_tokens=ref_tokens) as rec:
        pred = run(unet, sample, t, kw, encoder_hidden_states=k)
    (pred.square().mean() + 10.0 * rec.loss.sum()).backward()
    assert len(rec.layer_losses) == TWINS[kind][1]
    for name, loss in rec.layer_losses.items():
        assert_close(loss, state.losses[name], 1e-9, name)
    assert_close(k.grad, k_ref.grad, 1e-8, "d key_states")


def test_ragged_rows_are_checked_against_the_call():
    unet, _, _ = ref_pair("sd15", torch.float32)
    sample, t, kw = make_call(unet)
    ctl = install(unet)
    refs = torch.randn(1, M, text_width(unet))
    with pytest.raises(ValueError, match=r"^ref_tokens must select as many tokens per row as tokens \(\[3, 1\]\)"):
        ctl.subject_loss(refs, [[1, 2, 3], [4]], ref_tokens=[[1, 2], [4, 5]])
    with pytest.raises(ValueError, match=r"^tokens has 3 rows but the UNet call has batch 2"):
        with torch.no_grad(), ctl.capture([[1], [2, 3], [4]]):
            run(unet, sample, t, kw)
    with pytest.raises(ValueError, match=r"^tokens must index the 77 text tokens.*got index 80"):
        with torch.no_grad(), ctl.capture([[1], [2, 80]]):
            run(unet, sample, t, kw)
    with pytest.raises(ValueError, match=r"every row must select at least one key"):
        ctl.capture([[1], []])


# ------------------------------------------------------------------------------------------------
# recorders: loud errors, accumulation over the calls of a block
# ------------------------------------------------------------------------------------------------
def test_reading_before_a_call_names_the_cause():
    unet, _, _ = ref_pair("sd15", torch.float32)
    ctl = install(unet)
    with ctl.subject_loss(torch.randn(1, M, text_width(unet)), [1]) as rec:
        pass
    for attr in ("loss", "layer_losses", "maps"):
        with pytest.raises(NoCallError, match=rf"SubjectLossRecorder.{attr}: no UNet call ran inside the "
                                              r"`with ctl.subject_loss"):
            getattr(rec, attr)
    with ctl.capture([1]) as cap:
        pass
    with pytest.raises(NoCallError, match="AttentionRecorder.maps: no UNet call"):
        cap.aggregate(8)
    with pytest.raises(ValueError, match="accumulate must be one of"):
        ctl.capture([1], accumulate="sum")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_accumulate_keeps_every_call(checkpointing):
    unet, ref, state = ref_pair("sd15")
    calls = [make_call(unet, dtype=torch.float64) for _ in range(3)]
    tokens = [[1, 3], [2, 5, 8]]  # ragged as well
    ref_maps, ref_grads = [], []
    state.tokens = tokens
    for sample, t, kw in calls:
        state.maps = {}
        ehs = kw["encoder_hidden_states"].clone().requires_grad_(True)
        run(ref, sample, t, kw, encoder_hidden_states=ehs)
        ref_maps.append(dict(state.maps))
        sum(m.square().sum() for m in state.maps.values()).backward()
        ref_grads.append(ehs.grad)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    ctl = install(unet)
    recs = {}
    for mode in ("list", "mean"):
        leaves = []
        with ctl.capture(tokens, accumulate=mode) as rec:
            for sample, t, kw in calls:
                leaves.append(kw["encoder_hidden_states"].clone().requires_grad_(True))
                run(unet, sample, t, kw, encoder_hidden_states=leaves[-1])
        recs[mode] = rec
        assert rec.num_calls == 3
        if mode == "list":
            assert len(rec.steps) == 3
            for step, want in zip(rec.steps, ref_maps):
                assert list(step) == list(want)  # run order
                for name in want:
                    assert_close(step[name], want[name], 1e-10, name)
            sum(m.square().sum() for step in rec.steps for m in step.values()).backward()
            for leaf, g in zip(leaves, ref_grads):
                assert_close(leaf.grad, g, 1e-9, "d encoder_hidden_states (list)")
        else:
            for name in ref_maps[0]:
                assert_close(rec.maps[name], sum(r[name] for r in ref_maps) / 3, 1e-10, name)
            with pytest.raises(ValueError, match="steps needs capture"):
                rec.steps
    assert_close(recs["mean"].aggregate(4), sum(recs["list"].aggregate(4, step=i) for i in range(3)) / 3,
                 1e-10, "aggregate")


def test_heatmap_grid_image(tmp_path):
    from PIL import Image

    unet, _, _ = ref_pair("sd15", torch.float32)
    sample, t, kw = make_call(unet)
    ctl = install(unet)
    with torch.no_grad(), ctl.capture([1, 2, 3], accumulate="mean") as rec:
        run(unet, sample, t, kw)
        run(unet, sample, t, kw)
    image = Image.new("RGB", (64, 64), (120, 60, 30))
    grid = rec.save_heatmaps(tmp_path / "out-maps.png", image, labels=["a", "photo", "of"], res=8, row=1)
    loaded = Image.open(tmp_path / "out-maps.png")
    assert loaded.size == grid.size and loaded.size[0] == 2 * 64 and loaded.size[1] > 2 * 64  # 4 tiles, 2x2
    first, second = (grid.crop((x, 16, x + 64, 64)) for x in (0, 64))
    assert first.getpixel((10, 10)) == (120, 60, 30) and second.getpixel((10, 10)) != (120, 60, 30)
    with pytest.raises(ValueError, match="one label per map"):
        rec.save_heatmaps(tmp_path / "x.png", labels=["a"], res=8)
    with pytest.raises(IndexError, match="row must lie in"):
        rec.save_heatmaps(tmp_path / "x.png", res=8, row=2)
