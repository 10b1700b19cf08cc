"""The encidfs command line: mount, umount, exec and unit (main.py), the client commands
(commands.py, `encidfs top` in top.py), and mount(8)'s helper (mount_helper.py).  Nothing is
imported here: a client command starts without the daemon's modules (see encidfs/__main__.py)."""
