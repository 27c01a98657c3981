"""SeFi-IDE recipe on tiny offline SD1.5 / SDXL pipelines (structural-twin UNets, random weights).

One module-scoped set of pipelines and trained subjects is shared by the tests:
  * sd15 pipeline, written by the ``semfid-tiny-pipeline`` console script;
  * subject ``<v1>`` (face, attention mode): ``semfid-train`` console script, 4 steps, checkpoint at 2;
  * subject ``<v2>`` (cat, direct mode, another template): ``semfid.sefi.train``, 4 steps;
  * sdxl pipeline and subject ``<x1>``: ``semfid.sefi.train``, 4 steps.
The bad-input cases call the entry-point functions (``train_main`` / ``generate_main``) in process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from PIL import Image  # noqa: E402

import semfid  # noqa: E402
from semfid.sefi.batches import diffusion_target  # noqa: E402
from semfid.sefi.checkpoints import latest_checkpoint  # noqa: E402
from semfid.sefi.cli import _generate_parser, _tiny_parser, _train_parser, generate_main, train_main  # noqa: E402
from semfid.sefi.config import GenerateConfig, TrainConfig  # noqa: E402
from semfid.sefi.errors import SefiInputError  # noqa: E402
from semfid.sefi.generate import generate  # noqa: E402
from semfid.sefi.learned import TOKENS_FILE, load_learned, save_learned  # noqa: E402
from semfid.sefi.options import given_options  # noqa: E402
from semfid.sefi.pipeline import detect_kind, load_components  # noqa: E402
from semfid.sefi.sample import SefiSampler  # noqa: E402
from semfid.sefi.text import PromptEncoder, subject_token_indices  # noqa: E402
from semfid.sefi.tiny import TinyPipelineConfig, build_tiny_pipeline  # noqa: E402
from semfid.sefi.tokens import SefiTokens, stage_of  # noqa: E402
from semfid.sefi.train import SefiTrainer, train  # noqa: E402

RES = 64
FIRST_ATTN2 = {"sd15": "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
               "sdxl": "down_blocks.1.attentions.0.transformer_blocks.0.attn2"}


def _script(name: str) -> str:
    """The installed console script beside this interpreter (``pip install -e .`` puts it there)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"console script {name} is not installed (pip install --no-build-isolation -e .)")
    return str(path)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    # the child imports the same semfid as this process (a checkout beside an editable install of another)
    root = str(Path(semfid.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _image(path: Path, seed: int, size=(80, 96)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# shared fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sefi")


@pytest.fixture(scope="module")
def sd15(work) -> Path:
    out = work / "sd15"
    proc = _run(_script("semfid-tiny-pipeline"), "sd15", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def sdxl(work) -> Path:
    return build_tiny_pipeline("sdxl", work / "sdxl")


@pytest.fixture(scope="module")
def images(work) -> dict:
    return {"face": _image(work / "face.png", 1), "face2": _image(work / "face2.jpg", 2, (72, 64)),
            "cat": _image(work / "cat.png", 3)}


@pytest.fixture(scope="module")
def sd15_tokenizer_hash(sd15) -> str:
    return _tree_hash(sd15 / "tokenizer") + _tree_hash(sd15 / "text_encoder")


@pytest.fixture(scope="module")
def subject_v1(work, sd15, images, sd15_tokenizer_hash) -> Path:
    out = work / "v1"
    proc = _run(_script("semfid-train"), "--model", str(sd15), "--image", str(images["face"]),
                "--image", str(images["face2"]), "--output", str(out), "--steps", "4", "--resolution",
                str(RES), "--placeholder", "<v1>", "--checkpoint-every", "2", "--seed", "3", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    return out


@pytest.fixture(scope="module")
def subject_v2(work, sd15, images):
    out = work / "v2"
    result = train(sd15, [images["cat"]], out, steps=4, resolution=RES, placeholder="<v2>", class_word="cat",
                   template="a photo of a {}", mode="direct", num_vectors=2, progress=False)
    return out, result


@pytest.fixture(scope="module")
def subject_x1(work, sdxl, images):
    out = work / "x1"
    result = train(sdxl, [images["face"]], out, steps=4, resolution=RES, placeholder="<x1>", progress=False)
    return out, result


@pytest.fixture(scope="module")
def sd15_components(sd15):
    return load_components(sd15)


# ------------------------------------------------------------------------------------------------
# tiny pipelines and tokens
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_pipeline_loads_offline_with_from_pretrained(kind, sd15, sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(sd15 if kind == "sd15" else sdxl, local_files_only=True)
    n_cross = sum(1 for name in pipe.unet.attn_processors if name.endswith("attn2.processor"))
    assert n_cross == (16 if kind == "sd15" else 70)
    ids = pipe.tokenizer("a photo of the face of person").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) == 9  # start, 7 words (each one token of the tiny vocabulary), end
    assert detect_kind(sd15 if kind == "sd15" else sdxl) == kind


def test_stage_of_follows_floor_t_S_over_T():
    t = torch.tensor([0, 199, 200, 399, 400, 999])
    assert stage_of(t, 5, 1000).tolist() == [0, 0, 1, 1, 2, 4]
    assert stage_of(999.9, 5, 1000).item() == 4  # float timesteps of some samplers
    assert stage_of(1000, 5, 1000).item() == 4  # clamped
    assert stage_of(torch.tensor([0, 333, 334, 999]), 3, 1000).tolist() == [0, 0, 1, 2]
    assert stage_of(torch.tensor([5, 999]), 1, 1000).tolist() == [0, 0]


@pytest.mark.parametrize("mode", ["attention", "direct"])
def test_token_module_starts_at_initializer_and_picks_stage_pairs(mode):
    init = [torch.randn(12), torch.randn(20)]
    tokens = SefiTokens(init, num_stages=4, num_vectors=2, mode=mode)
    pairs = tokens.all_pairs()
    assert [tuple(p.shape) for p in pairs] == [(4, 2, 2, 12), (4, 2, 2, 20)]
    for p, e in zip(pairs, init):  # every P^K / P^V starts exactly at the initializer embedding
        torch.testing.assert_close(p, e.expand_as(p))
    with torch.no_grad():
        for p in tokens.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pairs = tokens.all_pairs()
    (k0, v0), (k1, v1) = tokens(torch.tensor([3, 0, 3]))
    torch.testing.assert_close(k0, pairs[0][[3, 0, 3], 0])
    torch.testing.assert_close(v1, pairs[1][[3, 0, 3], 1])
    assert not torch.equal(k0, v0)


def test_layout_and_subject_token_alignment(sd15_components):
    enc = PromptEncoder(sd15_components.tokenizers, sd15_components.text_encoders, "sd15")
    # a class word the tiny vocabulary splits into 7 tokens, a placeholder of 2 vectors
    target = enc.layout("a photo of <v> in a park", {"<v>": 2})[0]
    ref = enc.layout("a photo of <v> in a park", {"<v>": 2}, substitute={"<v>": "bicycle"})[0]
    assert target.labels == ["<start>", "a", "photo", "of", "<v>[0]", "<v>[1]", "in", "a", "park", "<end>"]
    assert [(ph, pos, j) for ph, pos, j in target.slots] == [("<v>", 4, 0), ("<v>", 5, 1)]
    tokens, ref_tokens = subject_token_indices(target, ref)
    assert tokens == list(range(target.eos_index + 1))
    m = 7  # len("bicycle") characters
    assert ref_tokens == [0, 1, 2, 3, 4, 4 + m // 2, 4 + m, 5 + m, 6 + m, ref.eos_index]
    assert ref.eos_index == 7 + m


def test_encode_key_value_equals_two_separate_encodings(sd15_components):
    enc = PromptEncoder(sd15_components.tokenizers, sd15_components.text_encoders, "sd15")
    prompts = ["a photo of <a>", "<a> and <b> in a park"]
    layouts = [enc.layout(p, {"<a>": 1, "<b>": 2}) for p in prompts]
    gen = torch.Generator().manual_seed(0)
    a = [(torch.randn(2, 1, 32, generator=gen), torch.randn(2, 1, 32, generator=gen))]  # per prompt
    b = [(torch.randn(1, 2, 32, generator=gen), torch.randn(1, 2, 32, generator=gen))]  # shared
    with torch.no_grad():
        keys, values = enc.encode_key_value(layouts, {"<a>": a, "<b>": b})
        for role, states in ((0, keys), (1, values)):
            fills = [{"<a>": [a[0][role][i]], "<b>": [b[0][role][0]]} for i in range(2)]
            expect = enc.encode(layouts, fills)
            torch.testing.assert_close(states.hidden, expect.hidden, rtol=1e-6, atol=1e-6)
    assert keys.pooled is None and not torch.equal(keys.hidden, values.hidden)


# ------------------------------------------------------------------------------------------------
# command-line options come from the config dataclasses
# ------------------------------------------------------------------------------------------------
def _flags(parser) -> set:
    return {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}


def test_cli_flags_are_the_documented_ones():
    assert _flags(_train_parser()) == {
        "--model", "--image", "--output", "--steps", "--resolution", "--placeholder", "--class-word",
        "--initializer", "--template", "--stages", "--num-vectors", "--mode", "--attn-loss-weight", "--lr",
        "--batch-size", "--seed", "--mixed-precision", "--gradient-checkpointing", "--checkpoint-every",
        "--resume", "--variant", "--quiet"}
    assert _flags(_generate_parser()) == {
        "--model", "--embeddings", "--prompt", "--output", "--steps", "--resolution", "--guidance-scale",
        "--seed", "--attention-maps", "--variant", "--quiet"}
    assert _flags(_tiny_parser()) == {"--seed", "--prediction-type"}


@pytest.mark.parametrize("make, cls, required", [
    (_train_parser, TrainConfig, ["--model", "m", "--image", "i", "--output", "o"]),
    (_generate_parser, GenerateConfig, ["--model", "m", "--embeddings", "e", "--prompt", "p", "--output", "o"]),
    (_tiny_parser, TinyPipelineConfig, ["sd15", "dir"]),
])
def test_cli_defaults_are_the_config_defaults(make, cls, required):
    parser = make()
    assert given_options(parser.parse_args(required), cls) == {}  # unset flags: the dataclass default
    helps = {a.dest: a.help for a in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name in helps and f.default is not None and f.default is not False:
            shown = ", ".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            assert shown in helps[f.name], (f.name, helps[f.name])


def test_cli_options_parse_to_config_fields():
    base = ["--model", "m", "--image", "i", "--output", "o"]
    given = given_options(_train_parser().parse_args(base + [
        "--steps", "7", "--class-word", "cat", "--lr", "0.5", "--gradient-checkpointing", "--mode", "direct"]),
        TrainConfig)
    assert given == {"steps": 7, "class_word": "cat", "lr": 0.5, "gradient_checkpointing": True, "mode": "direct"}
    assert TrainConfig(**given).validate().learning_rate == 0.5
    gen = _generate_parser().parse_args(["--model", "m", "--embeddings", "e", "--prompt", "p", "--output", "o",
                                         "--seed", "7", "--seed", "8", "--guidance-scale", "2"])
    assert given_options(gen, GenerateConfig) == {"seeds": [7, 8], "guidance_scale": 2.0}
    with pytest.raises(SystemExit):
        _train_parser().parse_args(base + ["--mode", "bogus"])
    with pytest.raises(TypeError, match="stepz"):
        train("m", ["i"], "o", stepz=3)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _check_output_folder(out: Path, kind: str, placeholder: str, widths, cross_dim):
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == ["sefi_config.json", "sefi_tokens.safetensors"]
    every = [p for p in out.rglob("*") if p.is_file()]
    assert every and all(p.suffix in (".json", ".safetensors") for p in every), every  # never pickles
    with open(out / "sefi_config.json") as f:
        cfg = json.load(f)
    assert cfg["placeholder"] == placeholder and cfg["kind"] == kind
    assert cfg["token_widths"] == widths and cfg["cross_attention_dim"] == cross_dim
    assert cfg["num_stages"] == 5 and cfg["num_train_timesteps"] == 1000
    assert cfg["training"]["steps"] == 4 and cfg["training"]["resolution"] == RES
    assert cfg["training"]["attn_loss_weight"] == 0.003
    learned = load_learned(out)
    for p in learned.pairs:  # trained: no longer all equal to the initializer embedding
        assert torch.isfinite(p).all()
        assert not torch.allclose(p, p[0, 0, 0].expand_as(p))
    return cfg, learned


def test_train_cli_sd15_writes_tokens_and_keeps_pipeline_untouched(subject_v1, sd15, sd15_tokenizer_hash):
    cfg, learned = _check_output_folder(subject_v1, "sd15", "<v1>", [32], 32)
    assert cfg["class_word"] == "person" and cfg["template"] == "a photo of the face of {}"
    assert cfg["mode"] == "attention" and len(cfg["training"]["model"]) > 0
    assert learned.module_state["generators.0.out.weight"].abs().sum() > 0  # zero-initialised
    # the checkpoint at step 2 is kept; the user's pipeline folder is unchanged
    assert latest_checkpoint(subject_v1).name == "step-000002"
    assert _tree_hash(sd15 / "tokenizer") + _tree_hash(sd15 / "text_encoder") == sd15_tokenizer_hash


def test_train_sd15_direct_mode_losses_finite_and_params_change(subject_v2, sd15_components):
    out, result = subject_v2
    assert len(result.mse) == 4 and len(result.subject) == 4
    assert all(math.isfinite(v) and v > 0 for v in result.mse + result.subject)
    cfg, learned = _check_output_folder(out, "sd15", "<v2>", [32], 32)
    assert cfg["class_word"] == "cat" and cfg["mode"] == "direct"
    comps = sd15_components
    init = PromptEncoder(comps.tokenizers, comps.text_encoders, "sd15").word_embeddings("cat")[0]
    moved = (learned.pairs[0] - init).abs().amax(dim=(1, 2, 3))
    assert (moved > 0).any()


def test_train_sdxl_losses_finite_and_params_change(subject_x1):
    out, result = subject_x1
    assert len(result.mse) == 4
    assert all(math.isfinite(v) and v >= 0 for v in result.mse + result.subject)
    # one vector initialised from the class word: the target prompt equals the reference prompt at
    # first, so the subject loss starts at exactly zero and grows once the tokens move
    assert result.subject[0] == 0 and result.subject[-1] > 0
    _, learned = _check_output_folder(out, "sdxl", "<x1>", [32, 32], 64)
    assert len(learned.pairs) == 2  # one set of pairs per text encoder


def _trainer(components, **overrides) -> SefiTrainer:
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    cfg = TrainConfig(resolution=RES, **overrides).validate()
    return SefiTrainer(components, [img], cfg)


# The tokens start at the initializer's embedding; with the class word as initializer the target and
# reference maps are equal and the subject loss sits at its minimum (zero gradient). These tests
# initialise from another word so that the subject loss and its gradient are non-zero.
def test_attention_loss_gradient_reaches_the_chosen_stage_only(sd15_components):
    trainer = _trainer(sd15_components, mode="direct", initializer="dog")
    try:
        pixels, _ = trainer.sample_batch()
        t = torch.tensor([450])  # stage 2 of 5
        mse, subject = trainer.losses(pixels, timesteps=t)
        assert torch.isfinite(subject) and subject > 0
        (grad,) = torch.autograd.grad(subject, [trainer.token_module.generators[0].pairs])
        per_stage = grad.abs().sum(dim=(1, 2, 3))
        assert per_stage[2] > 0 and torch.isfinite(grad).all()
        assert per_stage[[0, 1, 3, 4]].sum() == 0
        assert grad[2, 0].abs().sum() > 0  # P^K gets the attention-loss gradient
    finally:
        trainer.controller.uninstall()


def test_attention_loss_gradient_reaches_the_self_attention_generator(sd15_components):
    trainer = _trainer(sd15_components, mode="attention", initializer="dog")
    try:
        pixels, _ = trainer.sample_batch()
        _, subject = trainer.losses(pixels, timesteps=torch.tensor([999]))
        assert subject > 0
        gen = trainer.token_module.generators[0]
        subject.backward()
        assert gen.out.weight.grad.abs().sum() > 0 and torch.isfinite(gen.out.weight.grad).all()
    finally:
        trainer.controller.uninstall()


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(sd15_components):
    def run(checkpointing: bool):
        comps = sd15_components
        trainer = _trainer(comps, mode="direct", initializer="dog", gradient_checkpointing=checkpointing)
        try:
            gen = torch.Generator().manual_seed(0)
            pixels = torch.rand(1, 3, RES, RES, generator=gen) * 2 - 1
            noise = torch.randn(1, 4, RES // 8, RES // 8, generator=gen)
            trainer.generator.manual_seed(5)
            mse, subject = trainer.losses(pixels, timesteps=torch.tensor([700]), noise=noise)
            (mse + 0.003 * subject).backward()
            assert comps.unet.is_gradient_checkpointing == checkpointing
            return mse.detach(), subject.detach(), trainer.token_module.generators[0].pairs.grad.clone()
        finally:
            trainer.controller.uninstall()
            comps.unet.disable_gradient_checkpointing()

    plain, ckpt = run(False), run(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_v_prediction_target_follows_scheduler_config():
    from diffusers import DDPMScheduler

    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    torch.testing.assert_close(diffusion_target(v, latents, noise, t), v.get_velocity(latents, noise, t))
    with pytest.raises(SefiInputError, match="sample"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


def test_save_load_round_trip_and_resume_matches_uninterrupted_run(subject_v1, sd15, images, work):
    learned = load_learned(subject_v1)
    from safetensors import safe_open

    with safe_open(str(subject_v1 / TOKENS_FILE), framework="pt") as f:
        assert set(f.keys()) >= {"pairs.0", "module.generators.0.out.weight"}
    # the module state reproduces the stored pairs
    module = SefiTokens([torch.zeros(32)], num_stages=5, num_vectors=1, mode="attention")
    module.load_state_dict(learned.module_state)
    torch.testing.assert_close(module.all_pairs()[0].detach(), learned.pairs[0])
    # resume from the step-2 checkpoint in a fresh folder: same tokens as the 4-step run
    resumed = work / "v1-resumed"
    shutil.copytree(subject_v1 / "checkpoints", resumed / "checkpoints")
    rc = train_main(["--model", str(sd15), "--image", str(images["face"]), "--image", str(images["face2"]),
                     "--output", str(resumed), "--steps", "4", "--resolution", str(RES), "--placeholder",
                     "<v1>", "--checkpoint-every", "2", "--seed", "3", "--resume", "--quiet"])
    assert rc == 0
    torch.testing.assert_close(load_learned(resumed).pairs[0], learned.pairs[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_kv_separation_values_change_output_not_maps(kind, request):
    """Changing P^V changes the UNet output but not the attention maps; changing P^K changes the maps.

    The maps are those of the first cross-attention layer, whose queries come from the image alone:
    deeper layers' queries do depend on earlier layers' outputs, hence on the values.
    """
    if kind == "sd15":
        comps, learned = request.getfixturevalue("sd15_components"), load_learned(request.getfixturevalue("subject_v1"))
    else:
        comps = load_components(request.getfixturevalue("sdxl"))
        learned = load_learned(request.getfixturevalue("subject_x1")[0])
    ph, layer = learned.placeholder, FIRST_ATTN2[kind]
    sampler = SefiSampler(comps, [learned])
    try:
        layouts = sampler.layouts([f"a photo of {ph} at the beach"])
        stages = {ph: 1}

        def perturbed(role):  # role 0: P^K, 1: P^V of stage 1, in every text encoder
            out = [p.clone() for p in learned.pairs]
            for p in out:
                p[1, role] += torch.randn_like(p[1, role]) * 0.5
            return out

        def run(pairs):
            keys, values = sampler.text_states(layouts, stages, {ph: pairs})
            x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            added = None
            if kind == "sdxl":
                added = {"text_embeds": keys.pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
            with torch.no_grad(), sampler.controller.values(values.hidden):
                with sampler.controller.capture([0, 1, 2, 3, 4], layers=[layer]) as rec:
                    out = comps.unet(x, torch.tensor([300]), encoder_hidden_states=keys.hidden,
                                     added_cond_kwargs=added).sample
            return keys.hidden, values.hidden, rec.maps[layer], out

        k0, v0, m0, o0 = run(learned.pairs)
        k1, v1, m1, o1 = run(perturbed(1))
        assert torch.equal(k0, k1) and not torch.equal(v0, v1)  # P^V reaches only the value states
        assert torch.equal(m0, m1)  # maps depend on keys only
        assert (o0 - o1).abs().max() > 1e-6  # the output does change
        k2, v2, m2, _ = run(perturbed(0))
        assert not torch.equal(k0, k2) and torch.equal(v0, v2)
        assert (m0 - m2).abs().max() > 0
        # the sampler picks each placeholder's pair by timestep
        assert sampler.stages(torch.tensor(999.0)) == {ph: 4}
        assert sampler.stages(torch.tensor(1)) == {ph: 0}
    finally:
        sampler.close()


def test_two_placeholders_each_use_their_own_pairs(sd15_components, subject_v1, subject_v2):
    s1, s2 = load_learned(subject_v1), load_learned(subject_v2[0])
    sampler = SefiSampler(sd15_components, [s1, s2])
    try:
        layouts = sampler.layouts(["<v1> and <v2> shaking hands"])
        pos1 = [p for ph, p, _ in layouts[0][0].slots if ph == "<v1>"][0]
        pos2 = [p for ph, p, _ in layouts[0][0].slots if ph == "<v2>"][0]
        assert pos1 < pos2
        stages = {"<v1>": 0, "<v2>": 3}
        keys, _ = sampler.text_states(layouts, stages)
        changed = s2.pairs[0].clone()
        changed[3, 0] += 1.0  # subject 2's P^K at its stage
        keys2, _ = sampler.text_states(layouts, stages, {"<v1>": s1.pairs, "<v2>": [changed]})
        # causal text encoder: positions before <v2> are untouched, <v2> onwards change
        assert torch.equal(keys.hidden[:, :pos2], keys2.hidden[:, :pos2])
        assert not torch.equal(keys.hidden[:, pos2], keys2.hidden[:, pos2])
        changed1 = s1.pairs[0].clone()
        changed1[0, 0] += 1.0
        keys3, _ = sampler.text_states(layouts, stages, {"<v1>": [changed1], "<v2>": s2.pairs})
        assert not torch.equal(keys.hidden[:, pos1], keys3.hidden[:, pos1])
    finally:
        sampler.close()


def test_generate_cli_two_subjects_in_one_prompt_writes_images_and_heatmaps(sd15, subject_v1, subject_v2, work):
    out, maps = work / "gen15", work / "maps15"
    proc = _run(_script("semfid-generate"), "--model", str(sd15), "--embeddings", str(subject_v1),
                "--embeddings", str(subject_v2[0]), "--prompt", "<v1> and <v2> shaking hands",
                "--prompt", "a photo of <v2>", "--output", str(out), "--steps", "2", "--resolution",
                str(RES), "--seed", "7", "--seed", "8", "--attention-maps", str(maps), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00-s7.png", "00-s8.png", "01-s7.png", "01-s8.png"]
    with Image.open(out / "00-s7.png") as a, Image.open(out / "00-s8.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    with Image.open(out / "00-s7.png") as im:
        assert im.size == (RES, RES)
    first = sorted(p.name for p in (maps / "00-s7").iterdir())  # <v2> has 2 vectors
    assert first == ["01-v1.png", "02-and.png", "03-v2_0.png", "04-v2_1.png", "05-shaking.png", "06-hands.png"]
    assert sorted(p.name for p in (maps / "01-s7").iterdir()) == ["01-a.png", "02-photo.png", "03-of.png",
                                                                   "04-v2_0.png", "05-v2_1.png"]
    with Image.open(maps / "00-s7" / "03-v2_0.png") as im:
        assert im.size[0] == RES and im.size[1] > RES  # the image plus a label strip


def test_generate_sdxl_in_process_with_maps(sdxl, subject_x1, work):
    out = work / "x1.png"
    results = generate(sdxl, [subject_x1[0]], ["a photo of <x1> in a park"], output=out, steps=2,
                       resolution=RES, guidance_scale=5.0, seeds=[1], attention_maps=work / "mapsxl",
                       progress=False)
    assert len(results) == 1 and results[0].path == out and out.is_file()  # one image: exactly --output
    assert results[0].labels == ["a", "photo", "of", "<x1>", "in", "a", "park"]
    assert results[0].maps.shape == (7, 4, 4) and torch.isfinite(results[0].maps).all()
    assert len(list((work / "mapsxl" / "00-s1").iterdir())) == 7
    assert np.asarray(results[0].image).std() > 0


# ------------------------------------------------------------------------------------------------
# bad input: one error line, exit status 2, nothing written
# ------------------------------------------------------------------------------------------------
def _expect_error(capsys, main, argv, pattern, untouched):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].split(": error: ")[0] in ("semfid-train", "semfid-generate"), err
    assert pattern in err[0], err
    assert not Path(untouched).exists()


def test_train_bad_inputs(capsys, sd15, images, subject_v1, work):
    out = work / "never"
    base = ["--model", sd15, "--image", images["face"], "--output", out, "--steps", "1", "--resolution", RES]
    garbage = work / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    no_index = work / "not-a-pipeline"
    no_index.mkdir(exist_ok=True)
    cases = [
        (["--model", work / "missing"] + base[2:], "does not exist"),
        (["--model", no_index] + base[2:], "model_index.json"),
        (base[:2] + ["--image", work / "missing.png"] + base[4:], "does not exist"),
        (base[:2] + ["--image", garbage] + base[4:], "cannot decode image"),
        (base + ["--template", "a photo of the face"], "--template"),
        (base + ["--placeholder", "two words"], "--placeholder"),
        (base + ["--resolution", "60"], "--resolution"),
        (base + ["--steps", "0"], "--steps"),
    ]
    for argv, pattern in cases:
        _expect_error(capsys, train_main, argv, pattern, out)
    # an existing run is not overwritten
    before = _tree_hash(subject_v1)
    rc = train_main([str(a) for a in base[:4] + ["--output", subject_v1]])
    assert rc == 2 and "already holds" in capsys.readouterr().err
    assert _tree_hash(subject_v1) == before


def test_generate_bad_inputs(capsys, sd15, sdxl, subject_v1, subject_v2, subject_x1, work):
    out, maps = work / "never.png", work / "never-maps"
    base = ["--model", sd15, "--embeddings", subject_v1, "--prompt", "a photo of <v1>", "--output", out,
            "--steps", "1", "--resolution", RES, "--attention-maps", maps]
    # embeddings of another width: a consistent folder for a 48-wide text encoder
    wide = work / "wide"
    learned = load_learned(subject_v1)
    save_learned(wide, [torch.zeros(5, 2, 1, 48)], {}, dict(learned.config, placeholder="<w>",
                                                               token_widths=[48]))
    clash = work / "clash"
    shutil.copytree(subject_v2[0], clash)
    cfg = json.loads((clash / "sefi_config.json").read_text())
    cfg["placeholder"] = "<v1>x"  # contains <v1>: ambiguous in prompts
    (clash / "sefi_config.json").write_text(json.dumps(cfg))
    cases = [
        (["--model", work / "missing"] + base[2:], "does not exist"),
        (base[:2] + ["--embeddings", work / "missing"] + base[4:], "does not exist"),
        (base[:2] + ["--embeddings", work] + base[4:], "not a semfid-train output"),
        (base[:4] + ["--prompt", "a photo of a person"] + base[6:], "contains none of the placeholders"),
        (base + ["--prompt", "a photo"], "prompt 2"),
        (["--model", sdxl] + base[2:], "trained on a sd15 model"),
        (base[:2] + ["--embeddings", subject_x1[0], "--prompt", "a photo of <x1>"] + base[6:], "sdxl"),
        (base[:2] + ["--embeddings", wide, "--prompt", "a photo of <w>"] + base[6:], "token width"),
        (base + ["--embeddings", subject_v1], "collide"),
        (base + ["--embeddings", clash], "collide"),
        (base[:4] + ["--prompt", "a " * 80 + "<v1>"] + base[6:], "tokens long"),
        (base + ["--steps", "0"], "--steps"),
    ]
    for argv, pattern in cases:
        _expect_error(capsys, generate_main, argv, pattern, out)
        assert not maps.exists()


def test_python_module_entry_point_runs_commands():
    proc = _run(sys.executable, "-m", "semfid.sefi.cli", "train", "--help")
    assert proc.returncode == 0 and "--attn-loss-weight" in proc.stdout and "--gradient-checkpointing" in proc.stdout
    proc = _run(sys.executable, "-m", "semfid.sefi.cli", "bogus")
    assert proc.returncode == 2
