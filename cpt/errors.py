"""User-facing errors: raised for mistakes a user can fix, printed as one line without a traceback."""


class CptError(Exception):
    """A problem with the user's input (recipe, files, checkpoint) that names the problem and the fix."""


class RecipeError(CptError):
    """A recipe that does not validate: the message starts with the offending key path."""


class NonFiniteLossError(CptError):
    """The training loss became NaN or infinite; raised before the optimizer step so weights stay finite."""
