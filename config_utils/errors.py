"""The one error type the step scripts turn into a one-line message and exit code 2."""


class PipelineError(Exception):
    """Bad input the user can fix: the message names the file, key or value and what to do."""
