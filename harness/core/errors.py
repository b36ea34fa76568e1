"""The one error type for bad input, how every command refuses it, and the exit codes.

A refusal names the key or file, the value, what was expected and what to do, in under 1,000
characters (a long value is shortened where it is shown); no traceback reaches the user for it
unless they ask (`--debug`, or HARNESS_DEBUG=1).
"""

import errno
import os
import sys
import traceback

from harness.core.outcome import STATUSES

# What `python -m harness` exits with, by how its cell ended (harness/core/outcome.py's
# STATUSES) or why none ran; a sweep exits with its most severe cell's (EXIT_SEVERITY).
# docs/exit-codes.md says the same to users.
EXIT_CODES = {
    **{status: meaning.exit_code for status, meaning in STATUSES.items()
       if meaning.exit_code is not None},
    "duplicate": 0,   # a sweep's grid point that another grid point runs
    "bug": 1,         # the harness itself failed: Python's own code, with the traceback
    "refused": 2,     # bad input, refused before any run was created
    "incomplete": 6,  # no finished run: another runner holds the cell, or it never ran
}
# A signal that stopped the run (Ctrl-C, a kill, a time limit) exits 128 + its number, as a
# shell reports a process killed by it: 130 for SIGINT, 143 for SIGTERM.
KILLED_BASE = 128
EXIT_SEVERITY = ("failed", "oom", "diverged", "incomplete")  # the first one found wins
MAX_MESSAGE = 1000
MAX_VALUE = 120


class ConfigError(ValueError):
    """Bad input (config value, data file, invalid cell), raised before any expensive work."""

    def __init__(self, message: str, limit: int | None = MAX_MESSAGE):
        """`limit`: None for a list of refusals (a sweep's), each of them shortened already."""
        if limit is not None and len(message) > limit:  # the key first, what to do last
            cut = len(message) - limit + 40
            message = f"{message[:600]} … ({cut:,} characters left out) … {message[600 + cut:]}"
        super().__init__(message)


def shown(value, limit: int = MAX_VALUE) -> str:
    """A value as an error shows it: whole when short, else its start, its end and its
    length."""
    text = "".join(character if character.isprintable() else repr(character)[1:-1]
                   for character in str(value))  # a newline shown as \n, not as a new line
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}…{text[-limit // 4:]} ({len(text):,} characters)"


def debugging() -> bool:
    return os.environ.get("HARNESS_DEBUG", "") not in ("", "0")


def refused(error: ConfigError) -> int:
    """Say why a command refuses its input, as every entry point says it (`error: ...` on
    stderr, the traceback too when debugging); the exit status for it, 2."""
    if debugging():
        traceback.print_exc()
    print(f"error: {error}", file=sys.stderr)
    return EXIT_CODES["refused"]


def exit_code(statuses) -> int:
    """The exit status of a command whose cells ended with `statuses`: 0 when each is ok,
    skipped or a duplicate; else the code of the most severe (a status not listed counts as
    failed)."""
    found = {status if status in EXIT_CODES else "failed" for status in statuses}
    for status in EXIT_SEVERITY:
        if status in found:
            return EXIT_CODES[status]
    return 0


# A write that failed for want of space, in words: the errors a full disk gives.
DISK_FULL = {errno.ENOSPC: "no space left on the device",
             errno.EDQUOT: "the disk quota is exceeded",
             errno.EFBIG: "the file size limit (ulimit -f) is reached"}


def disk_full(error: BaseException) -> str | None:
    """What a write that failed for want of space says (`no space left on the device writing
    F (...)`), from the error or what caused it; None for any other error."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            where = f" writing {shown(seen.filename)}" if seen.filename else ""
            return (f"{DISK_FULL[seen.errno]}{where} ({type(seen).__name__}: {seen.strerror}); "
                    "free space there, or point cache_dir, TMPDIR and tracking.journal_dir at "
                    "another disk")
        seen = seen.__cause__ or seen.__context__
    if "No space left on device" in str(error):  # a library's own error around the OSError
        return (f"no space left on the device ({type(error).__name__}: {shown(error)}); free "
                "space, or point cache_dir, TMPDIR and tracking.journal_dir at another disk")
    return None
