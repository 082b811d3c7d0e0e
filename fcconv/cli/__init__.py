"""The ``fcconv`` command: parse, one library call, render, exit 0 / 1 / 2.

Exit codes follow ``cmp``: 0 done or equivalent, 1 verification found a
difference, 2 the command could not run. Every job lives in
:mod:`fcconv.api`; this package knows people and pipes only: the group and
what commands share in :mod:`fcconv.cli.group`, the commands by family in
:mod:`fcconv.cli.checkpoints`, :mod:`fcconv.cli.models`, :mod:`fcconv.cli.maps`.
"""

from fcconv.cli import checkpoints, maps, models  # each registers its commands on `cli`
from fcconv.cli.group import (
    BUG_REPORT,
    EXIT_DIFFERENT,
    EXIT_OK,
    EXIT_TROUBLE,
    FcconvGroup,
    cli,
    finish,
    phases,
    say,
    verbosity,
    warn,
    with_options,
)
from fcconv.cli.models import convolutionalize

main = cli

__all__ = [
    "BUG_REPORT",
    "EXIT_DIFFERENT",
    "EXIT_OK",
    "EXIT_TROUBLE",
    "FcconvGroup",
    "checkpoints",
    "cli",
    "convolutionalize",
    "finish",
    "main",
    "maps",
    "models",
    "phases",
    "say",
    "verbosity",
    "warn",
    "with_options",
]

if __name__ == "__main__":  # pragma: no cover
    main()
