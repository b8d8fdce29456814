"""Tasks wired as their libraries land."""


def specs(m, lay):
    return []
