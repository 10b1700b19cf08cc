"""Durable state: a write-ahead journal of changes (changes.py) in a SQLite file (store.py)."""
