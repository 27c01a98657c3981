"""The one error class of the SeFi-IDE recipe for bad user input."""

from __future__ import annotations


class SefiInputError(ValueError):
    """Bad input from the user (a file, an option, a prompt); the message is one readable line.

    The command-line tools print it as ``prog: error: <message>`` and exit with status 2.
    """


__all__ = ["SefiInputError"]
