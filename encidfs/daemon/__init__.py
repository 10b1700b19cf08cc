"""The daemon: the only place that knows all the parts.  serve.py wires the engine, the file
tables, membership, the journal, the FUSE adapter and the control socket and runs them; the
event bus (bus.py) hands each batch of the engine's events to its consumers; the supervisor
(supervisor.py) mounts again when the daemon dies; config.py and controllers.py say what a mount
is made of; metrics.py exports it to Prometheus; sdnotify.py tells systemd.

Nothing is imported here: the command line reads config.py and supervisor.py without loading
pyfuse3, trio or prometheus_client."""
