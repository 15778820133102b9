"""Errors of the memory bank (Redis storage and vector index)."""


class BankError(Exception):
    """Root of the errors raised by ``memory_bank``."""


class BankUnavailableError(BankError):
    """Redis could not be reached after the configured retries."""


class BankCorruptError(BankError):
    """Stored bank data does not match the expected shape (dimension, dtype)."""
