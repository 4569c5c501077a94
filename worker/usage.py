"""The error of a value given on the command line that its command refuses, once it
parsed: the command line answers it as it answers a bad argument (exit 2)."""


class UsageError(ValueError):
    """A flag's value that parsed, refused once the command runs by what it is used with
    (a size past a checkpoint's bounds, a setting that does not validate): a usage
    error all the same, exit 2."""
