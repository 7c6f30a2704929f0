"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user can fix; the message names the file and the fix."""


class OtherRun(UserError):
    """A run folder holds a run made otherwise (other settings, other splits). ``run`` and
    ``what`` are kept apart from fit's way out (``hint``) for callers that have their own: a
    sweep's run is redone by deleting its folder, not by fit's overwrite=true."""

    def __init__(self, run: object, what: str, hint: str) -> None:
        self.run, self.what = str(run), what
        super().__init__(self.saying(hint))

    def saying(self, hint: str) -> str:
        """The refusal with ``hint`` as its way out."""
        return f"'{self.run}' holds a run {self.what}; {hint}."
