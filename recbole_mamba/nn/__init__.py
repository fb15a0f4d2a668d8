"""Building blocks: the Mamba mixer with its backends, and the pure-PyTorch selective scan."""
