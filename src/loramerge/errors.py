"""The one exception type users see: bad usage or bad input, reported as `Error: ...`, exit 2."""


class LoramergeError(Exception):
    """A problem with the user's input or environment; the message is shown as is."""

    exit_code = 2
