"""CUDA graphs of the forward: whole decode steps (``decode``) and, for steps with prefill
chunks, chains of pieces cut at every attention call (``piecewise``)."""
