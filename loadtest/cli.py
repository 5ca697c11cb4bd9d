"""CLI of the loadtest stage (filled in by its issue)."""


def register(sub):
    pass
