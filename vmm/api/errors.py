"""Errors the API answers with: an HTTP status and a one-line ``fault_message``, never a traceback."""


class ApiError(Exception):
    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    """The request is malformed or not allowed in the VM's current state (400)."""
    status = 400


class NotFound(ApiError):
    """No such path, or no such resource under it (404)."""
    status = 404


class MethodNotAllowed(ApiError):
    """The path exists but does not take this method (405); ``allowed`` goes to the Allow header."""
    status = 405

    def __init__(self, message: str, allowed: list[str]):
        super().__init__(message)
        self.allowed = allowed


class GuestTimeout(ApiError):
    """The guest did not answer an invocation in time (504: the VMM is fine, its upstream is slow)."""
    status = 504
