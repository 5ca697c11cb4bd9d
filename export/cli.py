"""CLI of the export stage (filled in by its issue)."""


def register(sub):
    pass
