"""The controllers encidfs offers, in the order cgroup.controllers lists them.  A controller is
an engine module (its css and try_charge) and a file table (its cftype rows): adding one is
adding its line here."""

from __future__ import annotations

from ..engine.encids import EncidsController
from ..engine.misc import MiscController
from ..engine.resource import ResourceController
from ..files.encids import encids_files
from ..files.kernfs import FileTableMaker
from ..files.misc import misc_files

CONTROLLERS: dict[str, tuple[type[ResourceController], FileTableMaker]] = {
    "encids": (EncidsController, encids_files),
    "misc": (MiscController, misc_files),
}
