"""``python -m recallprune`` and the ``recallprune`` command: the study's command line, with a
missing optional dependency reported in one line that names the extra to install."""

from __future__ import annotations

import sys

from ._extras import MissingExtra, missing_message


def main(argv: list[str] | None = None) -> int:
    try:
        from .study.cli import main as cli_main

        return cli_main(argv)
    except MissingExtra as error:
        message = str(error)
    except ModuleNotFoundError as error:
        message = missing_message(error.name)
        if message is None:
            raise
    print(f"recallprune: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
