"""Durable state: a write-ahead journal of changes (changes.py), and its files (store.py)."""
