"""encidfs: a cgroup v2 file system with an Encryption IDs controller."""
