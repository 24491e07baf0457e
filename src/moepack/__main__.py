"""`python -m moepack` runs the `moepack` command line."""

from moepack.cli import main

main()
