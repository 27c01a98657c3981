"""The validation layer of the SeFi-IDE recipe, part 1: values, templates, placeholders and output paths.

Every check raises :class:`~semfid.sefi.errors.SefiInputError` with one line naming the option (or the
file and field, see :mod:`semfid.sefi.schemas`) and what was expected, so that bad input fails before
any model is loaded or anything is written. The file formats' schemas use the same value checks.
"""

from __future__ import annotations

import math
import numbers
import re
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .errors import SefiInputError
from .files import PathLike

#: Seeds are integers in ``[0, MAX_SEED]`` (room for the per-process and per-sampler offsets added
#: to them below torch's 64-bit limit).
MAX_SEED = 2 ** 62
#: Largest magnitude of a stored or trained token value: CLIP's token embeddings are below 1; far
#: larger values overflow the text encoder's layer norm (an all-black image) and mean a diverged run.
MAX_TOKEN_ABS = 1e4
#: Largest training crop / generated image side in pixels.
MAX_RESOLUTION = 4096
#: Most vectors per P^K / P^V (a prompt has 75 token slots between its start and end tokens).
MAX_VECTORS = 75
#: Most timestep stages.
MAX_STAGES = 1000


def integer(name: str, value, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int (an integer type, not a bool or a float) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SefiInputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise SefiInputError(f"{name} must be an integer in [{_bound(low, '-inf')}, {_bound(high)}], got {value}")
    return value


def number(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SefiInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        span = f"{'(' if low_open else '['}{_bound(low, '-inf')}, {_bound(high)}]"
        raise SefiInputError(f"{name} must be a finite number in {span}, got {value}")
    return value


def _bound(value, infinite: str = "inf") -> str:
    if value is None:
        return infinite
    return "2**62" if value == MAX_SEED else f"{value:g}"


def seed(name: str, value) -> int:
    """A seed: an integer in ``[0, MAX_SEED]``."""
    return integer(name, value, 0, MAX_SEED)


def choice(name: str, value, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise SefiInputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def resolution(name: str, value) -> Optional[int]:
    """None (the model's native size) or a multiple of 8 in ``[8, MAX_RESOLUTION]``."""
    if value is not None and (integer(name, value, 8, MAX_RESOLUTION) % 8):
        raise SefiInputError(f"{name} must be a multiple of 8 in [8, {MAX_RESOLUTION}], got {value}")
    return value


def template(name: str, value) -> str:
    """A prompt template: exactly one ``{}`` (the placeholder or class word) and no other brace."""
    if not isinstance(value, str) or value.count("{}") != 1 or re.search(r"[{}]", value.replace("{}", "", 1)):
        raise SefiInputError(f"{name} must contain '{{}}' exactly once and no other '{{' or '}}', got {value!r}")
    return value


def placeholder(name: str, value) -> str:
    """A placeholder: a non-empty string without whitespace or braces."""
    if not isinstance(value, str) or not value or re.search(r"[\s{}]", value):
        raise SefiInputError(f"{name} must be a non-empty string without whitespace, '{{' or '}}', got {value!r}")
    return value


def placeholder_pattern(placeholders: Sequence[str]) -> Optional["re.Pattern"]:
    """A regex matching any of ``placeholders`` as a whole word (longest first), or None when none.

    A placeholder matches only where no letter, digit or ``_`` touches it on either side: ``cat`` is
    found in ``"a cat."`` but not in ``"category"``.
    """
    if not placeholders:
        return None
    alternatives = "|".join(re.escape(p) for p in sorted(placeholders, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def distinct_placeholders(sources: Mapping[str, str]) -> None:
    """Placeholders (``placeholder -> where it comes from``) must not equal or contain each other."""
    seen = list(sources.items())
    for i, (p, source) in enumerate(seen):
        for other, other_source in seen[:i]:
            if p in other or other in p:
                raise SefiInputError(f"placeholders collide: {p!r} ({source}) and {other!r} ({other_source}) "
                                     "(one contains the other); train each subject with its own --placeholder")


def not_a_word(name: str, value: str, tokenizers: Sequence) -> None:
    """A placeholder must not already be one token of a tokenizer's vocabulary (``dog``, ``sks``).

    Such a word has a meaning the frozen text encoder knows, and a prompt could not tell the learned
    subject from the word.
    """
    for tok in tokenizers:
        pieces = tok.tokenize(value)
        if len(pieces) == 1:
            raise SefiInputError(f"{name} {value!r} is already a word of the tokenizer ({pieces[0]!r}); "
                                 "choose a new string such as '<v*>'")


def _existing_ancestor(path: Path) -> Path:
    for parent in [path] + list(path.parents):
        if parent.exists():
            return parent
    return Path(".")


def writable_folder(name: str, path: PathLike) -> Path:
    """``path`` is a folder, or can be created as one, and files can be written there.

    Probes the nearest existing ancestor with an anonymous temporary file (nothing stays behind).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SefiInputError(f"{name} {path} exists and is not a folder")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise SefiInputError(f"{name} {path}: {base} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise SefiInputError(f"{name} {path} is not writable ({base}: {exc.strerror or exc})") from None
    return path


def writable_file(name: str, path: PathLike) -> Path:
    """``path`` names a file (not a folder) whose folder exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise SefiInputError(f"{name} {path} is a folder, expected an image file name")
    if not path.parent.is_dir():
        raise SefiInputError(f"{name} {path}: the folder {path.parent} does not exist")
    writable_folder(name, path.parent)
    return path


__all__ = ["integer", "number", "seed", "choice", "resolution", "template", "placeholder", "placeholder_pattern",
           "distinct_placeholders", "not_a_word", "writable_folder", "writable_file", "MAX_SEED",
           "MAX_TOKEN_ABS", "MAX_RESOLUTION", "MAX_VECTORS", "MAX_STAGES"]
