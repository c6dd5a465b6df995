"""Django's entry point for recovery's tables; they are defined in :mod:`recovery.store.models`."""

from .store.models import *  # noqa: F401,F403
from .store.models import __all__  # noqa: F401
