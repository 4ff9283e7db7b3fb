"""argparse pieces shared by every CLI: one-line errors and real boolean flags."""
import argparse

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors (``run_cli`` prints them and exits 2)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def str2bool(value):
    """Parse a boolean flag value; junk is an error (the released ``type=bool`` took "False" as True)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"'{value}' is not a boolean; expected true or false")


def bool_flag(parser, name, default, help_text):
    """``--flag``, ``--flag true`` and ``--flag false`` all work (released-tool spelling)."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                        help=f"{help_text} (default {default})")
