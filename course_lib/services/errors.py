"""The one exception the services layer raises."""

__all__ = ["ServiceError"]


class ServiceError(RuntimeError):
    """A service cannot be provided; the message says which one and what to do.

    The message is a single line written for a person, so command-line tools print it
    without a traceback.
    """
