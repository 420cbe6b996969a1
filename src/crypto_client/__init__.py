"""crypto-client: a complete, exact history of Deribit index prices, served over HTTP."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crypto-client")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
