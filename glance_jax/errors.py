"""The one exception type that user-facing code raises for bad input.

The command line prints its message as a single line and exits non-zero, so
messages must name the problem (the file, the key, both shapes) by themselves.
"""


class GlanceError(Exception):
    """Bad input from a user: a path, a file, a key, a shape, a flag."""


class UsageError(GlanceError):
    """A command-line argument argparse itself refuses (unknown flag, bad choice): exit status 2."""
