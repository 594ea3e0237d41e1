"""Parallelism for a built model: meshes, all-to-all expert dispatch, FSDP2 wrapping, DCP checkpoints."""
