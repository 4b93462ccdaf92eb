"""The one exception type that means "the user asked for something impossible", and the file
system failures that mean the same."""

import errno


class UserError(Exception):
    """Bad usage or bad input.

    The CLI prints the message as one line on stderr and exits with status 2; library callers
    can catch it like any exception. Raise it only for problems the user can fix (a missing path,
    a mismatched store, an impossible config), never for bugs.
    """


# Failures of the file system that the user fixes (permissions, a read-only or full disk, a path
# through a file, a name too long): the CLI reports them as bad input, not as a crash.
USER_FIXABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                                 errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOENT})


def os_error_line(err: OSError) -> str | None:
    """One line for a user-fixable file system failure (None for others): what failed, and where."""
    if err.errno not in USER_FIXABLE_ERRNOS:
        return None
    where = f": {err.filename}" if err.filename else ""
    advice = "; free some space and run the same command again" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{err.strerror or err}{where}{advice}"
