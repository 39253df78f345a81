"""edgestate: a Trio edge server between dApp browsers and Solana RPC / price providers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgestate")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"
