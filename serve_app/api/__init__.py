"""Wire adapters: one module per API family. Each turns its wire request into the
pipeline's canonical request and the pipeline's result back into its wire format."""
