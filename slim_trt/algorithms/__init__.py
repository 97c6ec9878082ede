"""Pure tensor algorithms: no I/O, no hooks, no model objects."""
