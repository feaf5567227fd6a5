"""The one exception type for bad user input: the CLI prints it as a single line and exits 2."""


class PeftDsError(ValueError):
    """A problem with the user's input (spec, config, files), reported before any work starts."""
