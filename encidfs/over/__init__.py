"""--over DIR: the encryption-ID controllers over the kernel's own cgroup v2 tree."""
