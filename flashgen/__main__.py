"""`python -m flashgen ...` runs the command line, same as the `flashgen` script."""
from flashgen.cli import main

main()
