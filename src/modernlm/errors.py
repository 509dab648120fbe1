"""The one exception type for user mistakes.

The CLI turns a `UserError` into a one-line message on stderr and exit code 2, never a traceback.
Raise it for anything the user can fix: a bad config value, a missing file, a corrupt checkpoint.
"""


class UserError(Exception):
    """A problem with the user's input (config, file, checkpoint); the message names it."""
