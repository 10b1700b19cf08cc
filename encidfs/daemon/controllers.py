"""The controllers encidfs offers, in the order cgroup.controllers lists them.  A controller is
an engine module (its css, its hooks, its settings and report) and a file table (its cftype
rows): adding one is adding its line here, or calling register() from a module that
`encidfs mount --controller-module` loads."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..engine.css import Controller
from ..engine.encids import EncidsController
from ..engine.misc import MiscController
from ..files.encids import encids_files
from ..files.kernfs import FileTableMaker
from ..files.misc import misc_files

CONTROLLERS: dict[str, tuple[type[Controller], FileTableMaker]] = {
    "encids": (EncidsController, encids_files),
    "misc": (MiscController, misc_files),
}


def register(controller: type[Controller], files: FileTableMaker) -> None:
    """Offer a controller besides the built-in ones, by its name."""
    CONTROLLERS[controller.name] = (controller, files)


def load_module(name: str) -> None:
    """Run a module that registers controllers: a module's name, or the path of a .py file."""
    if not name.endswith(".py"):
        importlib.import_module(name)
        return
    spec = importlib.util.spec_from_file_location(Path(name).stem, name)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name}")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
