"""`encidfs exec`: a command run with a mount as its /sys/fs/cgroup, in namespaces of its own
(namespace.py), with the system calls that would tell it apart from the kernel's answered by a
seccomp supervisor (seccomp.py) that reads and writes the caller's memory (caller.py) and makes
the cgroup bpf(2) calls on the kernel's cgroup over DIR (cgroup_bpf.py).  namespace.py and
seccomp.py are also run as `python -m encidfs.exec.namespace` and `python -m
encidfs.exec.seccomp` in the chain of processes that sets the command up."""
