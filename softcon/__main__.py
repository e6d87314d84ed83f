"""Allow ``python -m softcon``."""

from softcon.cli import main

main()
