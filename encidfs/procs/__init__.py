"""Process tracking: kernel process events turned into engine calls."""

from .tracker import ProcessTracker

__all__ = ["ProcessTracker"]
