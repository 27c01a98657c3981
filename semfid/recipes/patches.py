"""The recipes: for each supported diffusers example script, what to add and where.

This table is the one source of both ``semfid-recipe`` (which applies it to a script) and the
README's "Recipes" section (rendered from it by :func:`semfid.recipes.patcher.render_readme`; a
test checks the README against the rendering). Anchors are the start of a line of the script
(leading spaces ignored); a step applies to every line that starts with its anchor and the script
must hold exactly ``count`` of them, else ``semfid-recipe`` refuses and prints the anchor.

Known to match diffusers' repository at commit 58eb52c0 (main, August 2026, 0.40.0.dev0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

IMPORT = "from semfid.recipes import SemfidRecipe, add_semfid_arguments"


@dataclass(frozen=True)
class Step:
    r"""One edit of a script.

    Attributes:
        action (`str`): ``"after"`` (insert after the whole statement that starts on the anchor
            line), ``"before"`` (insert before it) or ``"wrap"`` (put the statement, every line of
            it one level deeper, under the one added line, a ``with`` header).
        anchor (`str`): the start of the line looked for, leading spaces removed.
        lines (`tuple[str]`): the added lines, indented relative to the anchor's line.
        count (`int`): how many lines of the script start with ``anchor`` (each one is edited).
        why (`str`): one line for the README.
    """

    action: str
    anchor: str
    lines: Tuple[str, ...]
    count: int = 1
    why: str = ""


@dataclass(frozen=True)
class Recipe:
    """The steps for one script, with what the README says about it."""

    title: str
    script: str  # path inside the diffusers repository
    steps: Tuple[Step, ...]
    note: str = ""
    model: str = "unet"  # the script's variable for the denoiser: "unet" or "transformer"


def _common_head(imports: str = "from diffusers.utils.import_utils import is_xformers_available") -> Tuple[Step, ...]:
    return (
        Step("after", imports, (IMPORT,), why="with the imports"),
        Step("after", "parser = argparse.ArgumentParser(", ("add_semfid_arguments(parser)",),
             why="the options --semfid_weight / --semfid_identifier / --semfid_class_word"),
    )


_LOSS = Step("before", "accelerator.backward(loss)", ("loss = semfid.add_loss(loss)",),
             why="after the prior-preservation and SNR-weighting branches: the loss is final here")
_WRAP_DECODED = Step("wrap", "model_pred = unet(",
                     ('with semfid.block(tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True), '
                      'semfid_encode):',), why="the batch's own prompts, decoded from its token ids")

_DIT_IMPORTS = "from diffusers.utils.torch_utils import is_compiled_module"
_WRAP_DIT = Step("wrap", "model_pred = transformer(", ("with semfid.block(prompts, semfid_encode):",),
                 why="`prompts` is batch[\"prompts\"]: the captions with --caption_column, class prompts "
                     "in the second half with prior preservation")
_DIT_NOTE = ("The subject loss runs one extra no-grad forward of the transformer per step (the reference "
             "prompt's text keys of each joint layer), and the text encoders stay in memory (the reference "
             "prompts are encoded every step) where the script would free them.")



def _dit_recipe(title: str, name: str, segments: str, encoders: Tuple[str, ...], why: str) -> Recipe:
    """A diffusers DreamBooth-LoRA transformer script's recipe (text encoders / tokenizers ``*_one`` ...)."""
    bound = ", ".join(f"text_encoder_{n}" for n in encoders), ", ".join(f"tokenizer_{n}" for n in encoders)
    setup = Step("after", "transformer.add_adapter(transformer_lora_config)", (
        f"semfid = SemfidRecipe(transformer, args, segments={segments})",
        f"def semfid_encode(prompts, encoders=({bound[0]}), tokenizers=({bound[1]})):  "
        "# bound here: the script deletes its names later",
        "    return encode_prompt(list(encoders), list(tokenizers), prompts, args.max_sequence_length)[0]",
    ), why=why)
    return Recipe(title=title, script=f"examples/dreambooth/train_dreambooth_lora_{name}.py", model="transformer",
                  steps=_common_head(_DIT_IMPORTS) + (setup, _WRAP_DIT, _LOSS), note=_DIT_NOTE)


RECIPES: Dict[str, Recipe] = {
    "textual-inversion": Recipe(
        title="Textual inversion (SD1.5)",
        script="examples/textual_inversion/textual_inversion.py",
        steps=_common_head() + (
            Step("after", "placeholder_token_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)", (
                "semfid = SemfidRecipe(unet, args, tokenizer, identifier=tokenizer.decode(placeholder_token_ids), "
                "class_word=args.initializer_token)",
                "def semfid_encode(prompts):  # reference prompts -> text states, as the loop encodes its own",
                "    input_ids = tokenizer(prompts, padding=\"max_length\", truncation=True, "
                "max_length=tokenizer.model_max_length, return_tensors=\"pt\").input_ids",
                "    return text_encoder(input_ids.to(unet.device))[0].to(dtype=weight_dtype)",
            ), why="installs the processors on the UNet; placeholder -> initializer token in the reference"),
            _WRAP_DECODED,
            _LOSS,
        ),
    ),
    "dreambooth-lora": Recipe(
        title="DreamBooth LoRA (SD1.5)",
        script="examples/dreambooth/train_dreambooth_lora.py",
        steps=_common_head() + (
            Step("after", "unet.add_adapter(unet_lora_config)", (
                "semfid = SemfidRecipe(unet, args, tokenizer)",
                "def semfid_encode(prompts):  # reference prompts -> text states, as the loop encodes its own",
                "    inputs = tokenize_prompt(tokenizer, prompts, tokenizer_max_length=args.tokenizer_max_length)",
                "    return encode_prompt(text_encoder, inputs.input_ids, inputs.attention_mask, "
                "text_encoder_use_attention_mask=args.text_encoder_use_attention_mask)",
            ), why="installs the processors; the LoRA weights of to_q / to_k / to_v get the loss's gradient"),
            _WRAP_DECODED,
            _LOSS,
        ),
        note="`--pre_compute_text_embeddings` is refused at start-up (the batch then holds no token ids "
             "and the text encoder is dropped).",
    ),
    "dreambooth-lora-sdxl": Recipe(
        title="DreamBooth LoRA (SDXL)",
        script="examples/dreambooth/train_dreambooth_lora_sdxl.py",
        steps=_common_head() + (
            Step("after", "unet.add_adapter(unet_lora_config)", (
                "semfid = SemfidRecipe(unet, args, [tokenizer_one, tokenizer_two])",
                "def semfid_encode(prompts):  # reference prompts -> the 2048-wide text states",
                "    return encode_prompt([text_encoder_one, text_encoder_two], [tokenizer_one, tokenizer_two], "
                "prompts)[0]",
            ), why="installs the processors; the LoRA weights of to_q / to_k / to_v get the loss's gradient"),
            Step("wrap", "model_pred = unet(", ("with semfid.block(prompts, semfid_encode):",), count=2,
                 why="both UNet calls (with and without --train_text_encoder); `prompts` is "
                     "batch[\"prompts\"]: the captions with --caption_column"),
            _LOSS,
        ),
    ),
    "dreambooth-lora-flux": _dit_recipe(
        "DreamBooth LoRA (Flux.1)", "flux", "[(tokenizer_two, args.max_sequence_length)]", ("one", "two"),
        "installs the processors (double- and single-stream blocks); the T5 positions of the identifier"),
    "dreambooth-lora-sd3": _dit_recipe(
        "DreamBooth LoRA (SD3 / SD3.5)", "sd3",
        "[([tokenizer_one, tokenizer_two], 77), (tokenizer_three, args.max_sequence_length)]", ("one", "two", "three"),
        "installs the processors (every joint block); CLIP-L + CLIP-G (77) and T5 positions of the identifier"),
}

__all__ = ["IMPORT", "RECIPES", "Recipe", "Step"]
