"""``fastnas`` / ``python -m fastnas``: the command line. Subcommands: ``search``."""

from __future__ import annotations

import sys

USAGE = "usage: fastnas {search} [options]   (fastnas search --help for the options)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    command, rest = argv[0], argv[1:]
    if command == "search":
        from fastnas.search.cli import main as search_main

        return search_main(rest)
    print(f"fastnas: error: unknown command {command!r}; choose: search", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
