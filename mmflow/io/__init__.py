"""Storage-backed I/O shared by every layer above storage: the local model-folder cache."""
