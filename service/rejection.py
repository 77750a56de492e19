"""`ImageRejected`: why one uploaded image cannot be scored (service/decoding.py, service/structure.py)."""

from __future__ import annotations


class ImageRejected(Exception):
    """One image cannot be scored. `status` is what a request holding only this image answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple:
        # Pickled by value when a worker process sends it back (service/decode_workers.py).
        return (ImageRejected, (self.status, self.code, self.message))
