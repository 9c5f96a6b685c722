"""``fastnas`` / ``python -m fastnas``: the command line. Subcommands: ``search``, ``train``, ``rank``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "search": "fastnas.search.cli",
    "train": "fastnas.train.cli",
    "rank": "fastnas.rank.cli",
}
USAGE = "usage: fastnas [--version] {search,train,rank} [options]   (fastnas <command> --help for the options)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        from fastnas import __version__

        print(f"fastnas {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastnas: error: unknown command {command!r}; choose: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
