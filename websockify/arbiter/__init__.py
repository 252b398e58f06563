"""The master and its workers: processes, signals, reloads, the wrapped program."""
