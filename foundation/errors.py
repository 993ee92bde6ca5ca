"""One exception type for mistakes a user can fix, and the CLI wrapper that prints them.

Every command catches `UserError` at the top and prints its message as one sentence
(what is wrong and how to fix it) instead of a traceback.
"""

import sys


class UserError(ValueError):
    """Bad input a user can fix: a missing file, a wrong flag, mismatched artifacts. A
    `ValueError`, so that Python callers of the pipeline can catch it as one."""


def run_cli(main, argv=None) -> None:
    """Run `main(argv)`; a UserError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
