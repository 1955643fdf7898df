"""Training data: a prepared token folder or a data spec, streamed as micro-batches per data-parallel copy."""
