"""Errors that tell the user what was wrong, where, and what to do."""


class StillhouseError(Exception):
    """Base class for errors a user can fix; the CLI prints the message without a traceback."""


class InputError(StillhouseError):
    """Bad input data or a bad model reference, caught before expensive work starts."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a stage; the message says where, and what a rerun resumes from.

    A KeyboardInterrupt, so that nothing that catches ``Exception`` swallows it on its way out.
    """
