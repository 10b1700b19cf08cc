"""The Python client for encidfs's control socket (see encidfs.control.client)."""

from .control.client import Allocation, Client, ControlError, figures

__all__ = ["Allocation", "Client", "ControlError", "figures"]
