"""One writer per data root: the daemon's lock, its local control socket, and the CLI's client of it."""
