"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (model, recipe, flags, files). The message is shown as is, on one line."""


class ExportFailed(Exception):
    """Capture or lowering failed for a supported model: reported on one line, exit code 1."""
