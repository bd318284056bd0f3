"""How a model builds the modules that several layers share (HyperBERT's hypernetwork, cross-layer
shared mixers).

``build_shared(factory)`` is ``factory()`` unless a trainer installed a builder with
``shared_builder``. The training engine does so when it builds a model partitioned across ranks:
there the shared modules must stay whole on every rank while everything else is split, and only the
engine knows how. The model code states *what* is shared; it knows nothing of how a trainer places it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)
Builder = Callable[[Callable[[], nn.Module]], nn.Module]

_builder: ContextVar[Optional[Builder]] = ContextVar("scale_hyper_shared_builder", default=None)


def build_shared(factory: Callable[[], M]) -> M:
    """Build a module that several layers share: ``factory()``, through the installed builder if any."""
    builder = _builder.get()
    return factory() if builder is None else builder(factory)  # type: ignore[return-value]


@contextmanager
def shared_builder(builder: Optional[Builder]) -> Iterator[None]:
    """Within the block, ``build_shared`` calls ``builder(factory)`` (None: plain construction)."""
    token = _builder.set(builder)
    try:
        yield
    finally:
        _builder.reset(token)
