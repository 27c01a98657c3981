"""The recipes for diffusers' example scripts: the patcher (semfid-recipe), the README rendered from
the same table, the run-time helper the patched scripts call, the shadowing messages, and the checker
that runs the real scripts (only when SEMFID_DIFFUSERS_DIR names a diffusers checkout)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from argparse import Namespace
from collections import Counter
from pathlib import Path

import pytest
import torch

from semfid.recipes.patcher import RecipeMismatch, apply_recipe, main as recipe_main, readme_section, render_readme
from semfid.recipes.patches import RECIPES
from semfid.recipes.runtime import SemfidRecipe, add_semfid_arguments, identifier_from_prompts

REPO = Path(__file__).resolve().parents[1]
DIFFUSERS = os.environ.get("SEMFID_DIFFUSERS_DIR")
needs_diffusers = pytest.mark.skipif(not DIFFUSERS, reason="SEMFID_DIFFUSERS_DIR does not name a diffusers "
                                                           "checkout (the real example scripts)")

# A stand-in written here with the lines the recipes anchor on, in the order the scripts have them
# (two UNet calls, prior preservation and SNR branches before the backward), to test the patcher
# without a diffusers checkout.
MINI = textwrap.dedent('''\
    import argparse
    from diffusers.utils.import_utils import is_xformers_available
    from diffusers.utils.torch_utils import is_compiled_module


    def parse_args():
        parser = argparse.ArgumentParser(
            description="mini"
        )
        return parser.parse_args()


    def main(args):
        placeholder_token_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
        unet.add_adapter(unet_lora_config)
        transformer.add_adapter(transformer_lora_config)
        for step, batch in enumerate(loader):
            if args.train_text_encoder:
                model_pred = unet(
                    x,
                    t,
                )[0]
            else:
                model_pred = unet(x, t)[0]
            if args.with_prior_preservation:
                prior_loss = 1.0
            if args.snr_gamma is None:
                loss = 2.0
            else:
                loss = 3.0
            if args.with_prior_preservation:
                loss = loss + prior_loss
            accelerator.backward(loss)
    ''')


def _calls(kind: str) -> int:
    return next(s.count for s in RECIPES[kind].steps if s.action == "wrap")


def _mini(kind: str) -> str:
    """MINI with as many model calls (UNet or transformer) as the recipe of ``kind`` expects."""
    source = MINI if _calls(kind) == 2 else MINI.replace("        else:\n            model_pred = unet(x, t)[0]\n", "")
    return source.replace("model_pred = unet(", f"model_pred = {RECIPES[kind].model}(")


def _with_blocks(tree: ast.AST, model: str):
    """(model-call assignments inside `with semfid.block(...)`, all model-call assignments)."""
    inside, calls = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and "semfid.block" in ast.unparse(node.items[0].context_expr):
            inside += [s for s in node.body if f"= {model}(" in ast.unparse(s)]
        if isinstance(node, ast.Assign) and ast.unparse(node).startswith(f"model_pred = {model}("):
            calls.append(node)
    return inside, calls


def _check_structure(kind: str, source: str, patched: str) -> None:
    model = RECIPES[kind].model
    tree = ast.parse(patched)
    inside, calls = _with_blocks(tree, model)
    assert calls and len(inside) == len(calls) == _calls(kind), "every model call wrapped"
    lines = patched.splitlines()
    loss = [i for i, line in enumerate(lines) if line.strip() == "loss = semfid.add_loss(loss)"]
    assert len(loss) == 1 and lines[loss[0] + 1].strip() == "accelerator.backward(loss)"
    # after every prior-preservation / SNR line and after the last UNet call
    late = [i for i, line in enumerate(lines) if "prior_loss" in line or "snr" in line or f"= {model}(" in line]
    assert loss[0] > max(late)
    setup = next(i for i, line in enumerate(lines) if line.strip().startswith("semfid = SemfidRecipe("))
    first_call = next(i for i, line in enumerate(lines) if f"model_pred = {model}(" in line)
    assert setup < first_call
    kept = Counter(line.strip() for line in source.splitlines())
    assert not kept - Counter(line.strip() for line in patched.splitlines()), "no line of the script lost"
    recipe_lines = sum(len(s.lines) * s.count for s in RECIPES[kind].steps)
    assert len(patched.splitlines()) - len(source.splitlines()) == recipe_lines  # the README's count


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_patcher_structure_on_a_stand_in(kind):
    source = _mini(kind)
    _check_structure(kind, source, apply_recipe(kind, source, "mini.py"))


@needs_diffusers
@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_patcher_structure_on_the_real_script(kind, tmp_path):
    script = Path(DIFFUSERS) / RECIPES[kind].script
    out = tmp_path / "patched.py"
    assert recipe_main([kind, str(script), "-o", str(out)]) == 0
    _check_structure(kind, script.read_text(), out.read_text())


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_patcher_refuses_a_mangled_script_naming_the_line(kind, tmp_path, capsys):
    source = _mini(kind)
    mangled = source.replace("accelerator.backward(loss)", "accelerator.backward(loss * 1)")
    with pytest.raises(RecipeMismatch, match=r"(?s)looked for 1 line\(s\) starting with\n    "
                                             r"accelerator\.backward\(loss\)\n.*found 0"):
        apply_recipe(kind, mangled, "mangled.py")
    model = RECIPES[kind].model
    extra = source + f"\n\ndef again():\n    model_pred = {model}(y)\n"  # one model call more than known
    with pytest.raises(RecipeMismatch, match=rf"looked for \d line\(s\) starting with\n    model_pred = {model}\("):
        apply_recipe(kind, extra, "extra.py")
    (tmp_path / "m.py").write_text(mangled)
    assert recipe_main([kind, str(tmp_path / "m.py"), "-o", str(tmp_path / "o.py")]) == 2
    assert "accelerator.backward(loss)" in capsys.readouterr().err and not (tmp_path / "o.py").exists()
    with pytest.raises(RecipeMismatch, match="already imports semfid.recipes"):
        apply_recipe(kind, apply_recipe(kind, source, "x.py"), "x.py")


def test_readme_recipes_are_the_rendered_table():
    assert readme_section((REPO / "README.md").read_text()) == render_readme()


# ------------------------------------------------------------------------------------------------
# run time: options, identifier, no silent zero
# ------------------------------------------------------------------------------------------------
def test_identifier_from_the_scripts_prompts():
    assert identifier_from_prompts("a photo of sks dog", "a photo of dog") == ("sks", None)
    assert identifier_from_prompts("a photo of sks", "a photo of dog") == ("sks", "dog")
    assert identifier_from_prompts("a photo of zwx toy car", "a photo of car") == ("zwx toy", None)
    with pytest.raises(ValueError, match="without --class_prompt; pass --semfid_identifier"):
        identifier_from_prompts("a photo of sks dog", None)
    with pytest.raises(ValueError, match="must differ in one span of words"):
        identifier_from_prompts("a sks photo of dog", "a photo of a dog cat")


def _args(**over):
    import argparse

    parser = argparse.ArgumentParser()
    add_semfid_arguments(parser)
    args = parser.parse_args([])
    base = dict(instance_prompt="a photo of sks dog", class_prompt="a photo of dog", with_prior_preservation=False)
    return Namespace(**{**vars(args), **base, **over})


def test_pre_compute_text_embeddings_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--pre_compute_text_embeddings is not supported"):
        SemfidRecipe(None, _args(pre_compute_text_embeddings=True), None)
    with pytest.raises(ValueError, match="--semfid_weight must be a finite number >= 0"):
        SemfidRecipe(None, _args(semfid_weight=-1.0), None)


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from semfid.sefi.tiny import build_tiny_pipeline

    return StableDiffusionPipeline.from_pretrained(build_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15")))


def _step(recipe, pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    encode = lambda ps: pipe.text_encoder(pipe.tokenizer(ps, padding="max_length", max_length=77, truncation=True,
                                                         return_tensors="pt").input_ids)[0]
    torch.manual_seed(0)
    x = torch.randn(len(prompts), 4, 8, 8)
    with recipe.block(prompts, encode):
        pred = pipe.unet(x, torch.tensor([500] * len(prompts)), encode(prompts)).sample
    loss = pred.square().mean()
    return loss, recipe.add_loss(loss)


@pytest.mark.slow
def test_the_batch_identifier_is_checked_and_the_loss_reaches_to_k(tiny_sd15):
    pipe = tiny_sd15
    recipe = SemfidRecipe(pipe.unet, _args(with_prior_preservation=True, semfid_weight=0.5), pipe.tokenizer)
    try:
        with pytest.raises(ValueError, match=r"the placeholder 'sks' appears in none of the 2 prompts "
                                             r"\['a photo of zwx dog', 'a photo of dog'\]"):
            recipe.block(["a photo of zwx dog", "a photo of dog"], None)
        with pytest.raises(ValueError, match=r"prompts\[0\] does not contain the placeholder 'sks'"):
            recipe.block(["a photo of dog", "a sks dog", "a photo of dog", "a photo of dog"], None)
        # instance rows (ragged, a caption among them) carry it, class rows (second half) may lack it
        prompts = ["a photo of sks dog", "a sks dog sitting on a red chair in the park", "a photo of dog",
                   "a photo of dog"]
        base, total = _step(recipe, pipe, prompts)
        subject = recipe.last_loss
        assert torch.isfinite(subject) and float(subject) > 0
        assert torch.equal(total.detach(), (base + 0.5 * subject).detach())
        to_k = [m.to_k.weight for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
        grads = torch.autograd.grad(total - base, to_k)
        assert all(g.abs().sum() > 0 for g in grads)
        with pytest.raises(RuntimeError, match="no UNet call ran inside `with semfid.block"):
            recipe.add_loss(base)
    finally:
        recipe.controller.uninstall()


def test_weight_zero_adds_nothing_but_still_checks_the_identifier(tiny_sd15):
    pipe = tiny_sd15
    recipe = SemfidRecipe(pipe.unet, _args(semfid_weight=0.0), pipe.tokenizer)
    try:
        with pytest.raises(ValueError, match="appears in none of the"):
            recipe.block(["a photo of dog"], None)
        base, total = _step(recipe, pipe, ["a photo of sks dog"])
        assert total is base and recipe.last_loss is None
    finally:
        recipe.controller.uninstall()


def test_tokenizers_or_segments_exactly_one():
    with pytest.raises(ValueError, match="give exactly one of tokenizers"):
        SemfidRecipe(None, _args(), None)
    with pytest.raises(ValueError, match="give exactly one of tokenizers"):
        SemfidRecipe(None, _args(), "tok", segments=[("tok", 8)])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_recipe_loop_on_a_tiny_pipeline(family, tmp_path):
    """The Flux / SD3 recipe's run-time path (segments alignment, a wrapped transformer call, add_loss)
    on a tiny pipeline, as the patched scripts call it: subject loss > 0, only instance rows, the loss's
    gradient reaches the attention projections of the joint blocks."""
    from diffusers import DiffusionPipeline

    from semfid.testing.tiny_dit import build_tiny_dit_pipeline

    from _dit_calls import make_call

    pipe = DiffusionPipeline.from_pretrained(build_tiny_dit_pipeline(family, tmp_path / family))
    if family == "flux":
        segments = [(pipe.tokenizer_2, 32)]
        encode = lambda ps: pipe.encode_prompt(ps, None, max_sequence_length=32)
    else:
        segments = [([pipe.tokenizer, pipe.tokenizer_2], 77), (pipe.tokenizer_3, 32)]
        encode = lambda ps: pipe.encode_prompt(ps, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=32)
    model = pipe.transformer
    recipe = SemfidRecipe(model, _args(with_prior_preservation=True, semfid_weight=0.5), segments=segments)
    try:
        prompts = ["a photo of sks dog", "a photo of dog"]  # instance row, class row
        with torch.no_grad():
            states, pooled = encode(prompts)[0], encode(prompts)[1 if family == "flux" else 2]
        torch.manual_seed(0)
        call = make_call(family, batch=2, text=states.shape[1])
        call.update(encoder_hidden_states=states, pooled_projections=pooled)
        with recipe.block(prompts, lambda ps: encode(ps)[0]):
            base = model(**call).sample.square().mean()
        total = recipe.add_loss(base)
        assert torch.isfinite(recipe.last_loss) and float(recipe.last_loss) > 0
        assert torch.equal(total.detach(), (base + 0.5 * recipe.last_loss).detach())
        projections = [m.to_q.weight for n, m in model.named_modules() if n.startswith("transformer_blocks.")
                       and n.endswith(".attn")]
        grads = torch.autograd.grad(total - base, projections)
        assert all(g.abs().sum() > 0 for g in grads)
    finally:
        recipe.controller.uninstall()


# ------------------------------------------------------------------------------------------------
# a clone of the repository shadowing the installed package
# ------------------------------------------------------------------------------------------------
def _python(code_or_module, cwd, module=False):
    cmd = [sys.executable, "-m", code_or_module] if module else [sys.executable, "-c", code_or_module]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_shadowing_clone_is_named(tmp_path):
    import shutil

    clone = tmp_path / "clone"
    shutil.copytree(REPO / "semfid", clone / "semfid", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    got = _python("import semfid", clone)
    said = f"semfid is imported from {clone / 'semfid'}, which shadows the installed"
    assert got.returncode == 0 and said in got.stderr, got.stderr
    # the folder holds a clone's root (no __init__.py): an empty namespace package
    (tmp_path / "outer" / "semfid").mkdir(parents=True)
    got = _python("semfid.info", tmp_path / "outer", module=True)
    assert got.returncode == 2 and "has no __init__.py: a clone of the repository" in got.stderr, got.stderr


def test_install_problem_without_metadata(monkeypatch, tmp_path):
    from importlib import metadata

    from semfid import _install_check

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_install_check.metadata, "distribution", missing)
    msg = _install_check.install_problem(str(tmp_path / "semfid" / "__init__.py"))
    assert "which is not installed (no package metadata)" in msg and f"pip install -e {tmp_path}" in msg
    assert "the Triton kernels (semfid.kernels) and the C++ CPU core are not available" in msg
    # a checkout with the kernels link and an in-place build (as gpu_check.sh runs it): not "missing"
    (tmp_path / "semfid" / "kernels").mkdir(parents=True)
    (tmp_path / "semfid" / "kernels" / "__init__.py").write_text("")
    (tmp_path / "semfid" / "_cpu_ops.so").write_bytes(b"")
    msg = _install_check.install_problem(str(tmp_path / "semfid" / "__init__.py"))
    assert "not available" not in msg and "found beside it" in msg and f"pip install -e {tmp_path}" in msg
    import semfid

    monkeypatch.undo()
    assert _install_check.install_problem(semfid.__file__) is None  # this checkout is the installed one


# ------------------------------------------------------------------------------------------------
# the checker on diffusers' real scripts
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_diffusers
def test_checker_on_the_real_scripts(tmp_path):
    pytest.importorskip("torchvision", reason="the example scripts need torchvision")
    pytest.importorskip("peft", reason="the DreamBooth LoRA scripts need peft")
    pytest.importorskip("datasets", reason="--caption_column needs datasets")
    got = subprocess.run([sys.executable, "-m", "semfid.recipes.check", "--diffusers", DIFFUSERS, "--work",
                          str(tmp_path)], capture_output=True, text=True, timeout=3600)
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-2000:]
    assert "| FAIL |" not in got.stdout and "| recipe on | pass |" in got.stdout
