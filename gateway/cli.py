"""CLI of the gateway stage (filled in by its issue)."""


def register(sub):
    pass
