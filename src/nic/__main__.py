"""``python -m nic``: the same command line as ``nic``."""

from nic.cli import main

main()
