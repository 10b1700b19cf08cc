"""The control socket: ID allocation for processes, its protocol, server and client."""
