"""The one exception type for bad user input: the CLI prints it as a single line and exits 2."""


class PeftDsError(ValueError):
    """A problem with the user's input (spec, config, files), reported before any work starts."""


def read_json(path: str, what: str):
    """The parsed JSON at `path`; a missing, unreadable or malformed file is one PeftDsError naming
    `what` and path."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise PeftDsError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise PeftDsError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise PeftDsError(f"{what} {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError as err:
        raise PeftDsError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise PeftDsError(f"{what} {path} is not valid JSON: {err}") from None
