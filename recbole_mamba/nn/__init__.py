"""Building blocks: the Mamba mixer with its backends, the pure-PyTorch selective scan, and the losses."""
