"""The one exception type for user mistakes.

The CLI turns a `UserError` into a one-line message on stderr and exit code 2, never a traceback.
Raise it for anything the user can fix: a bad config value, a missing file, a corrupt checkpoint.
`Interrupted` is training stopped by SIGINT / SIGTERM after a checkpoint: one line, exit 130 / 143.
"""


class UserError(Exception):
    """A problem with the user's input (config, file, checkpoint); the message names it."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT / SIGTERM after saving a checkpoint; rerunning resumes it.

    A KeyboardInterrupt, so `except Exception` never swallows it and the pipeline leaves its stage
    unfinished. The CLI prints the message as one line and exits 128 + signum (130, 143).
    """

    def __init__(self, signum: int, step: int, path: str | None):
        import signal

        self.signum, self.step, self.path = int(signum), step, path
        name = signal.Signals(self.signum).name
        where = f"checkpoint of step {step} in {path}" if path else f"no checkpoint (step {step})"
        super().__init__(f"stopped by {name} at step {step}: {where}; rerun the same command to resume from it")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
