"""Training-code integration: ragged prompts, accumulating recorders, loud errors, heatmap grids,
and the README's textual-inversion recipe run as a 3-step loop on the tiny SD1.5 pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semfid.diffusers import NoCallError, align_tokens, install

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


# ------------------------------------------------------------------------------------------------
# the README's textual-inversion recipe, in a training loop written here
# ------------------------------------------------------------------------------------------------
def _textual_inversion(directory, checkpointing: bool):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(directory)
    tok, te, unet, sched = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.scheduler
    tok.add_tokens(["<cat-toy>"])
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[tok.convert_tokens_to_ids("<cat-toy>")] = emb[tok("cat", add_special_tokens=False).input_ids[0]]
    for p in list(unet.parameters()) + list(te.parameters()):
        p.requires_grad_(p is emb)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.SGD([emb], lr=1.0)
    templates = ["a photo of a {}", "a cat sitting on a red chair in the park with a {}"]

    def encode(prompts):
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return te(ids)[0]

    ctl = install(unet)                                                                   # recipe
    losses, grads = [], []
    for step in range(3):
        prompts = [templates[(step + i) % 2].format("<cat-toy>") for i in range(2)]
        ehs = encode(prompts)
        latents = torch.randn(2, 4, 8, 8)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,))
        noisy = sched.add_noise(latents, noise, t)
        aligned = align_tokens(tok, prompts, "<cat-toy>", "cat")                          # recipe
        ref_states = encode(aligned.ref_prompts).detach()                                 # recipe
        with ctl.subject_loss(ref_states, aligned) as rec:                                # recipe
            pred = unet(noisy, t, ehs).sample
        loss = F.mse_loss(pred, noise) + 0.003 * rec.loss.mean()                          # recipe
        loss.backward()
        losses.append((loss.detach(), rec.loss.detach()))
        grads.append(emb.grad.clone())
        opt.step()
        opt.zero_grad()
    assert len({len(r) for r in aligned.tokens}) == 2  # the rows really were ragged
    return losses, grads


def test_textual_inversion_recipe_with_and_without_checkpointing(tmp_path):
    from semfid.sefi.tiny import build_tiny_pipeline

    directory = build_tiny_pipeline("sd15", tmp_path / "sd15")
    plain = _textual_inversion(directory, checkpointing=False)
    ckpt = _textual_inversion(directory, checkpointing=True)
    for step, ((total, subject), (total_c, subject_c)) in enumerate(zip(plain[0], ckpt[0])):
        # step 0: the placeholder still has its initializer's embedding, so the target and the
        # aligned reference prompt encode alike and the maps agree (loss 0 up to rounding)
        assert float(subject.max()) < 1e-15 if step == 0 else float(subject.min()) > 0
        assert torch.equal(total, total_c) and torch.equal(subject, subject_c)
    for g, g_c in zip(plain[1], ckpt[1]):
        assert g.abs().sum() > 0 and torch.equal(g, g_c)


def _dreambooth_sdxl(directory, checkpointing: bool):
    """DreamBooth-style SDXL loop: identifier dropped in the reference, both tokenizers, grads to to_k."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(directory)
    toks, encs, unet = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], pipe.unet
    trained = [m.to_k.weight for n, m in unet.named_modules() if n.endswith("attn2")]
    for p in unet.parameters():
        p.requires_grad_(any(p is w for w in trained))
    if checkpointing:
        unet.enable_gradient_checkpointing()

    def encode(prompts):
        states, pooled = [], None
        for tok, enc in zip(toks, encs):
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(states, dim=-1), pooled

    ctl = install(unet)                                                                   # recipe
    prompts = ["a photo of sks dog", "a sks dog sitting on a red chair in the park"]
    with torch.no_grad():
        ehs, pooled = encode(prompts)
    latents, losses, grads = torch.randn(2, 4, 8, 8), [], []
    for step in range(2):
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,))
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        aligned = align_tokens(toks, prompts, "sks", None)                                # recipe
        ref_states = encode(aligned.ref_prompts)[0].detach()                              # recipe
        with ctl.subject_loss(ref_states, aligned) as rec:                                # recipe
            pred = unet(pipe.scheduler.add_noise(latents, noise, t), t, ehs, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, noise) + 0.003 * rec.loss.mean()                          # recipe
        loss.backward()
        losses.append(rec.loss.detach())
        grads.append(torch.cat([w.grad.flatten() for w in trained]))
        for w in trained:
            w.grad = None
    return losses, grads


def test_dreambooth_sdxl_recipe_with_and_without_checkpointing(tmp_path):
    from semfid.sefi.tiny import build_tiny_pipeline

    directory = build_tiny_pipeline("sdxl", tmp_path / "sdxl")
    plain = _dreambooth_sdxl(directory, checkpointing=False)
    ckpt = _dreambooth_sdxl(directory, checkpointing=True)
    for a, b in zip(plain[0], ckpt[0]):
        assert float(a.min()) > 0 and torch.equal(a, b)
    for g, g_c in zip(plain[1], ckpt[1]):
        assert g.abs().sum() > 0 and torch.equal(g, g_c)
