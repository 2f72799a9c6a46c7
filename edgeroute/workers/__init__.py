"""Several worker processes on one port: the supervisor, each worker's view of its siblings."""
