"""The math of the lecture in pure numpy: the network and backprop, the exact tree sum, the
optimizers, the learning-rate schedules, and how a range is cut into parts.  No Ray, no files."""
