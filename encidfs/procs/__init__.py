"""Processes: followed to their exit (watcher.py), and in the standalone tree to their forks,
threads and freezing (tracker.py), turned into engine calls; /proc/PID/stat read (procfs.py).

Nothing is imported here: procfs.py serves the command line and the tests too, which need not
load trio.
"""
