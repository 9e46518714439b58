"""The one exception type users see: a message that names the problem and the fix."""


class BitsweepError(Exception):
    """A problem with the user's input or environment, reported as one line by the CLI."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (often a multi-line compiler or parser report), or ""."""
    return (str(exc).strip().splitlines() or [""])[0]
