"""Errors that mean "the user asked for something we cannot do": reported as one line, exit status 2."""


class UserError(Exception):
    """A bad config value, a missing file or a missing optional dependency."""
