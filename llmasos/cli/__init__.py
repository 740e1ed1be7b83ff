"""The `llmasos` command line (the shell of the OS)."""
