"""What can go wrong when calling Deribit, split by what the caller should do about it."""


class DeribitError(Exception):
    """Any failure to get an answer from Deribit."""


class TransientDeribitError(DeribitError):
    """Worth retrying: timeouts, dropped connections, 5xx, malformed answers, rate limits."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(TransientDeribitError):
    """HTTP 429 or JSON-RPC `too_many_requests` (10028): wait before the next try."""


class PermanentDeribitError(DeribitError):
    """Retrying cannot help: Deribit rejected the request (unknown index, bad parameters)."""

    def __init__(self, message: str, *, code: int | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class RetriesExhaustedError(DeribitError):
    """Every allowed attempt failed with a transient error; `last_error` is the final one."""

    def __init__(self, message: str, *, attempts: int, last_error: TransientDeribitError) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error
