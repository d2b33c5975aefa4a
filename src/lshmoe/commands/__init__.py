"""The verbs of `lshmoe` that belong to no subsystem: train, export, bench (cli.py's `VERBS` lists all).

Each module has `main(argv) -> int`: it parses its own flags (lshmoe/cliutil.py) and returns an exit
status; the CLI turns the errors it raises into one line and a status (lshmoe.errors).
"""
