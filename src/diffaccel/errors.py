"""The one exception type for mistakes a user can fix (bad path, bad config, corrupt file)."""


class UserError(Exception):
    """Raised for bad input; the CLI prints the message alone and exits with status 2."""
