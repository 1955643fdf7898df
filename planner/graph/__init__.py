"""Stage 2, the graph: the dataflow IR, the tracer that builds it (each call annotated by its op's
rule), module scopes, repeated decoder layers, the Hugging Face front end and kernel fusion."""
