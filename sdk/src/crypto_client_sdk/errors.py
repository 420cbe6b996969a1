"""What can go wrong talking to the API, one exception type per thing a caller may handle."""


class CryptoClientError(Exception):
    """Any failure of a call; `status` is the HTTP status (None: no answer), `detail` the
    server's own explanation where it gave one."""

    def __init__(self, message: str, *, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail if detail is not None else message


class InvalidRequest(CryptoClientError):
    """The server refused the parameters (422/400): `detail` says which and why."""


class NotFound(CryptoClientError):
    """404: e.g. a ticker neither configured nor stored, or no price stored yet."""


class Unauthorized(CryptoClientError):
    """401/403: the API key is missing, unknown or not allowed this."""


class RetryableError(CryptoClientError):
    """The server asked to come back later, and the retries allowed are spent (or it asked
    for a longer wait than the client may take). `retry_after`: its wish, in seconds."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, detail=detail)
        self.retry_after = retry_after


class RateLimited(RetryableError):
    """429: too many requests for this key or address."""


class Unavailable(RetryableError):
    """503, or no answer at all (connection refused, reset, timed out)."""


class ServerError(CryptoClientError):
    """Any other answer that is not a success (e.g. 500)."""


class ProtocolError(CryptoClientError):
    """An answer the client cannot read (not the JSON or the events the API sends)."""
