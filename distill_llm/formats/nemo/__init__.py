"""NeMo checkpoints in and out, without nemo_toolkit: NeMo 1 `.nemo` files (and unpacked
directories) and NeMo 2 directories. `checkpoint` reads, `io` writes."""
