"""User-facing errors: one line that names the problem and the fix."""


class CometError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``error: <message>`` on one line and exits with status 2; library callers
    get an ordinary exception. The message must say what is wrong and how to fix it.
    """
