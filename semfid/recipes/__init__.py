"""The subject-wise attention loss inside diffusers' own example training scripts.

``semfid-recipe KIND SCRIPT -o OUT`` (:mod:`semfid.recipes.patcher`) writes a patched copy of a
script from the table in :mod:`semfid.recipes.patches`; the patched script calls
:class:`SemfidRecipe` (:mod:`semfid.recipes.runtime`). ``python -m semfid.recipes.check --diffusers
DIR`` runs every recipe on diffusers' real scripts with tiny pipelines (:mod:`semfid.recipes.check`).
"""

from .runtime import SemfidRecipe, add_semfid_arguments

__all__ = ["SemfidRecipe", "add_semfid_arguments"]
