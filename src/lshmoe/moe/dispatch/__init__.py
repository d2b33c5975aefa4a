"""Dispatchers: the seam that moves payload rows to their experts' ranks and back (protocol.py)."""

from lshmoe.moe.dispatch.build import build_dispatcher
from lshmoe.moe.dispatch.protocol import Dispatcher, DispatchMeta, Inflight

__all__ = ["Dispatcher", "DispatchMeta", "Inflight", "build_dispatcher"]
