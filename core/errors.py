"""The one exception type users see: a message that names the problem and the fix."""


class BitsweepError(Exception):
    """A problem with the user's input or environment, reported as one line by the CLI."""
