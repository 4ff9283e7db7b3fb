"""User-facing errors and the wrapper that turns them into one-line messages.

Every CLI entry point runs its ``main`` through :func:`run_cli`, so bad input
(a missing dataset, a malformed strategy file, an unreachable budget, ...) ends
with ``error: <what was expected>`` on stderr and a non-zero exit instead of a
traceback.
"""
import logging
import sys


class UserError(Exception):
    """Bad input from the user: the message says what was expected."""


def error_reason(exc, limit=160):
    """The line of ``exc``'s message that says why, for a one-line error.

    torch's load_state_dict errors start with a header ending in ':' ("Error(s) in loading
    state_dict for Actor:") and give the mismatching tensor on the next line.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return next((ln for ln in lines if not ln.endswith(":")), type(exc).__name__)[:limit]


def run_cli(main, args=None):
    """Call ``main(args)``; print a one-line message for a UserError and exit 2."""
    try:
        return main(args)
    except UserError as exc:
        msg = " ".join(str(exc).split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        logging.getLogger(__name__).warning("interrupted")
        print("error: interrupted by the user", file=sys.stderr)
        sys.exit(130)
