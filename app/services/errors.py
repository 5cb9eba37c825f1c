"""The one error type services raise: an HTTP status, a stable code, a message and the field at fault."""

from collections.abc import Mapping


class ApiError(Exception):
    """An error the caller can act on; rendered as `{"error": {"code", "message", "param"}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        """The error body."""
        return {"error": {"code": self.code, "message": self.message, "param": self.param}}
