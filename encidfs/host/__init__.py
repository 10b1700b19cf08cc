"""What the daemon and the command line ask of the host: its encryption-ID capacities, its
kernel's release, its mounts, its runtime directories, and mounting and unmounting.  Nothing
here imports the daemon, the command line or the engine."""
