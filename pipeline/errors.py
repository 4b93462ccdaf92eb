"""The one exception type that means "the user asked for something impossible"."""


class UserError(Exception):
    """Bad usage or bad input.

    The CLI prints the message as one line on stderr and exits with status 2; library callers
    can catch it like any exception. Raise it only for problems the user can fix (a missing path,
    a mismatched store, an impossible config), never for bugs.
    """
