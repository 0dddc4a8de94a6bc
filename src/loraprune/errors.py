"""Errors that are the user's to fix: the command line prints them without a traceback."""


class LoraPruneError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(LoraPruneError, ValueError):
    """An option value that is out of range or inconsistent with another option."""
