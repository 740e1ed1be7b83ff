"""`python -m llmasos` runs the CLI."""

from llmasos.cli.main import main

if __name__ == "__main__":
    main()
