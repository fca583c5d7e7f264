"""The training data: the built-in and on-disk datasets, the IDX reader, the sampler that
picks each step's global batch, and the check of data against the options."""
