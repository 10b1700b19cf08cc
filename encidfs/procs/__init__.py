"""Processes: followed to their exit (watcher.py), and in the standalone tree to their forks,
threads and freezing (tracker.py), turned into engine calls."""

from .tracker import ProcessTracker
from .watcher import ProcessWatcher

__all__ = ["ProcessTracker", "ProcessWatcher"]
