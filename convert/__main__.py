"""`python -m moepack.convert` runs the `moepack` command line."""

from .cli import main

main()
