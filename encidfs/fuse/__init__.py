"""The FUSE adapter."""
