"""The project's one user-facing error type.

Every problem a user can cause (bad head names, malformed data, missing models, bad options) is raised as
`LocauditError` with one line naming the problem and the fix; the CLI prints it and exits with code 2.
"""


class LocauditError(Exception):
    """A problem with the user's input or environment, with a one-line message saying how to fix it."""
