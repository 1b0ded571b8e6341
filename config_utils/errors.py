"""The one error type the step scripts turn into a one-line message and exit code 2, and its helper."""


class PipelineError(Exception):
    """Bad input the user can fix: the message names the file, key or value and what to do."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception in a few words, for a one-line message: its first line, cut, or its type's name."""
    text = str(error)
    return text.splitlines()[0][:limit] if text.strip() else type(error).__name__
