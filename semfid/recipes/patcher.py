"""``semfid-recipe KIND SCRIPT -o OUT``: write a patched copy of a diffusers example script.

The edits come from :data:`semfid.recipes.patches.RECIPES`, which also renders the README's
"Recipes" section (``semfid-recipe --readme`` prints it). A script that does not hold each anchor
line exactly as often as the recipe expects is refused with the line looked for.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .patches import RECIPES, Recipe, Step

README_BEGIN = "<!-- semfid-recipe: rendered by `semfid-recipe --readme`; edit semfid/recipes/patches.py -->"
README_END = "<!-- semfid-recipe: end -->"
_INDENT = "    "
_MODEL = {"unet": "UNet", "transformer": "transformer"}
_VERBS = {"after": "adds after it", "before": "adds before it", "wrap": "puts each one under"}


class RecipeMismatch(ValueError):
    """The script does not match what the recipe knows; the message names the line looked for."""


def _statement_spans(source: str, name: str) -> Dict[int, int]:
    """First line -> last line (1-based) of every statement of ``source``, the outermost one per line."""
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as exc:
        raise RecipeMismatch(f"{name} is not valid Python: {exc}") from exc
    spans: Dict[int, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt):
            spans[node.lineno] = max(spans.get(node.lineno, 0), node.end_lineno or node.lineno)
    return spans


def _find(lines: List[str], spans: Dict[int, int], step: Step, kind: str, name: str) -> List[Tuple[int, int]]:
    """(first, last) 0-based line range of each statement the step edits; refuses on a count mismatch."""
    hits = [i for i, line in enumerate(lines) if line.lstrip().startswith(step.anchor)]
    if len(hits) != step.count or any(i + 1 not in spans for i in hits):
        found = [f"line {i + 1}: {lines[i].strip()}" for i in hits]
        raise RecipeMismatch(
            f"{name} does not match the {kind} recipe: looked for {step.count} line(s) starting with\n"
            f"    {step.anchor}\n"
            f"(the recipe {_VERBS[step.action]}: {step.lines[0]})\n"
            f"found {len(hits)}{': ' + '; '.join(found) if found else ''}. This recipe knows "
            f"{RECIPES[kind].script} of diffusers' repository; edit the script by hand from the README."
        )
    return [(i, spans[i + 1] - 1) for i in hits]


def apply_recipe(kind: str, source: str, name: str = "script") -> str:
    r"""The patched source of a script.

    Args:
        kind (`str`): one of :data:`RECIPES` (``textual-inversion``, ``dreambooth-lora``,
            ``dreambooth-lora-sdxl``, ``dreambooth-lora-flux``, ``dreambooth-lora-sd3``).
        source (`str`): the script's text.
        name (`str`, *optional*): the script's name, for messages.

    Raises:
        ValueError: unknown ``kind``; :class:`RecipeMismatch` when an anchor is missing or found a
            different number of times, or the script already carries the recipe.
    """
    if kind not in RECIPES:
        raise ValueError(f"kind must be one of {sorted(RECIPES)}, got {kind!r}")
    if "semfid.recipes" in source:
        raise RecipeMismatch(f"{name} already imports semfid.recipes: patch the original script")
    return apply_steps(RECIPES[kind].steps, source, name, kind)


def apply_steps(steps: Sequence[Step], source: str, name: str, kind: str) -> str:
    """``source`` with ``steps`` applied (``kind`` names the recipe in messages); see :func:`apply_recipe`."""
    lines = source.splitlines(keepends=True)
    spans = _statement_spans(source, name)
    edits: List[Tuple[int, int, Step]] = []
    for step in steps:
        edits += [(first, last, step) for first, last in _find(lines, spans, step, kind, name)]
    for first, last, step in sorted(edits, key=lambda e: e[0], reverse=True):
        indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
        added = [indent + text + "\n" for text in step.lines]
        if step.action == "after":
            lines[last + 1:last + 1] = added
        elif step.action == "before":
            lines[first:first] = added
        else:  # wrap: the header, then the statement one level deeper
            body = [(_INDENT + line) if line.strip() else line for line in lines[first:last + 1]]
            lines[first:last + 1] = added + body
    return "".join(lines)


def _render(recipe: Recipe, kind: str) -> List[str]:
    added = sum(len(s.lines) * s.count for s in recipe.steps)
    wraps = sum(s.count for s in recipe.steps if s.action == "wrap")
    out = [f"**{recipe.title}** (`{recipe.script}`): `semfid-recipe {kind} {Path(recipe.script).name} "
           f"-o train_semfid.py`, or by hand: {added} added lines (`+`); every line of "
           f"{'the' if wraps == 1 else f'each of the {wraps}'} {_MODEL[recipe.model]} call{'' if wraps == 1 else 's'} "
           f"moves one level deeper under its `with` (`~`).", "", "```python"]
    for n, step in enumerate(recipe.steps):
        if n:
            out.append("  ...")
        anchor = f"  {step.anchor}{'...)' if step.anchor.endswith('(') else ''}"
        plus = [f"+ {line}" for line in step.lines]
        where = f"# {step.why}" + (f" ({step.count} places)" if step.count > 1 else "")
        if step.action == "after":
            out += [anchor + "   " + where] + plus
        elif step.action == "before":
            out += plus + [anchor + "   " + where]
        else:
            out += [plus[0] + "   " + where, f"~     {step.anchor}...)   # the whole call, one level deeper"]
    out += ["```"]
    if recipe.note:
        out += ["", recipe.note]
    return out


def render_readme() -> str:
    """The README's recipe snippets, between the markers, rendered from :data:`RECIPES`."""
    out = [README_BEGIN, ""]
    for kind, recipe in RECIPES.items():
        out += _render(recipe, kind) + [""]
    out.append(README_END)
    return "\n".join(out)


def readme_section(readme: str) -> str:
    """The rendered part of a README's text (from the begin marker to the end marker)."""
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError("the README has no semfid-recipe markers")
    return readme[start:end + len(README_END)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="semfid-recipe", description="Write a copy of a diffusers example training script with the semfid "
                                          "subject-wise attention loss added (options --semfid_weight, "
                                          "--semfid_identifier, --semfid_class_word).")
    parser.add_argument("kind", nargs="?", choices=sorted(RECIPES), help="which script this is")
    parser.add_argument("script", nargs="?", help="the script, e.g. train_dreambooth_lora_sdxl.py")
    parser.add_argument("-o", "--output", help="where to write the patched copy")
    parser.add_argument("--readme", action="store_true", help="print the README's recipe section and exit")
    args = parser.parse_args(argv)
    if args.readme:
        print(render_readme())
        return 0
    if not (args.kind and args.script and args.output):
        parser.error("KIND, SCRIPT and -o OUTPUT are required (or --readme)")
    source = Path(args.script).read_text()
    try:
        patched = apply_recipe(args.kind, source, args.script)
    except RecipeMismatch as exc:
        print(f"semfid-recipe: {exc}", file=sys.stderr)
        return 2
    Path(args.output).write_text(patched)
    print(f"semfid-recipe: wrote {args.output} ({args.kind} recipe); run it with the script's options plus "
          "--semfid_weight 0.003 (default) [--semfid_identifier WORD --semfid_class_word WORD]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
