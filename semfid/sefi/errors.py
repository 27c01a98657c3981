"""The error classes of the SeFi-IDE recipe: bad user input, and a training run that diverged."""

from __future__ import annotations


class SefiInputError(ValueError):
    """Bad input from the user (a file, an option, a prompt); the message is one readable line.

    The command-line tools print it as ``prog: error: <message>`` and exit with status 2.
    """


class SefiDivergedError(SefiInputError):
    """Training met a non-finite loss or token value (too high a learning rate, usually).

    The message names the step; nothing of the failing step is written, the checkpoints already on disk
    stay. ``semfid-train`` prints it as ``semfid-train: error: <message>`` and exits with status 3.
    """


__all__ = ["SefiInputError", "SefiDivergedError"]
