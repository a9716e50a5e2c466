"""Errors meant for a person: the CLI prints them as one line and exits 2, without a traceback."""


class UserError(Exception):
    pass
