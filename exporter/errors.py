"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (model, recipe, flags, files). The message is shown as is, on one line."""
