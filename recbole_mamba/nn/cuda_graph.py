"""A training forward and backward replayed as CUDA graphs (``cuda_graph: true``).

At hidden size 64 most kernels of a Mamba layer take a few microseconds of GPU time, less than the
host needs to launch them from Python and autograd. A lifelong batch (32 windows of 2,048 items)
spends about 14 ms on the GPU per step but took 15 to 18 ms with every kernel launched one by one.
``torch.cuda.make_graphed_callables`` records the encoder's forward and backward kernels once and
then launches each as one graph: the host cost no longer depends on the number of kernels.

Graphs need fixed shapes and no host-device synchronisation inside, so:

- a graph is built for the first training batch's shape (a full batch); a batch with fewer rows
  (the epoch's last) is padded with rows of zeros (padding items), whose outputs are dropped and
  whose gradients are zero; other shapes run eagerly. Padding, rather than running the last batch
  eagerly, also keeps the eager activations from being held beside the graph's memory;
- only training steps with gradients and without autocast use it (evaluation runs eagerly; under
  autocast the graph would need autocast's cache off);
- the loss stays outside the graph (its chunking reads how many positions are scored).

While the graph is built (:func:`building`), the fused element-wise operations of
:mod:`recbole_mamba.nn.fused` are used at every batch size (their host cost is paid once, at
capture), and ``scan_kernel: auto`` compares the scan kernels by their time as graphs.
"""

import contextlib
import logging
import threading

import torch
from torch import nn


_building = False
# Held while a graph is captured, and by any thread around CUDA work of its own (the batch
# prefetcher's pinned copies): a CUDA call from another thread during a capture invalidates it.
capture_lock = threading.Lock()


def building():
    """Whether a graph is being built (warm-up and capture) right now."""
    return _building


@contextlib.contextmanager
def _while_building():
    global _building
    previous, _building = _building, True
    try:
        yield
    finally:
        _building = previous


class _Forward(nn.Module):
    """``function`` as a module holding ``owner``'s parameters: make_graphed_callables returns
    gradients for a module's parameters, not for the tensors a plain function reads."""

    def __init__(self, owner, function):
        super().__init__()
        self.owner = owner
        self.function = function

    def forward(self, inputs):
        return self.function(inputs)


class GraphedTraining:
    """``function(inputs)``'s training forward and backward as CUDA graphs, for one input shape.

    ``owner``: the nn.Module whose parameters ``function`` uses (they receive their gradients as
    usual). Call :meth:`covers` to know whether a batch can be replayed, then call the object.
    """

    def __init__(self, owner, function):
        self._module = _Forward(owner, function)
        self._graphed = None
        self._shape = None  # the shape the graph was built for
        self._failed = False

    @property
    def built(self):
        """Whether a graph exists (and replays the batches of its shape)."""
        return self._graphed is not None

    def __deepcopy__(self, memo):
        # CUDA graphs cannot be copied, and they belong to the original's parameters: a copied
        # model builds its own at its first training step.
        return None

    def covers(self, inputs):
        """Whether this call would run as a graph: a CUDA training step with gradients, no autocast,
        and (once a graph exists) the shape it was built for, or as many rows or fewer."""
        if self._failed or not inputs.is_cuda or not torch.is_grad_enabled() or not self._module.owner.training:
            return False
        if torch.is_autocast_enabled("cuda"):
            return False
        if self._shape is None:
            return True
        return inputs.shape[1:] == self._shape[1:] and inputs.shape[0] <= self._shape[0]

    def __call__(self, inputs):
        if self._graphed is None:
            self._build(inputs)
        rows = inputs.shape[0]
        if rows == self._shape[0]:
            return self._graphed(inputs)
        padded = inputs.new_zeros(self._shape)
        padded[:rows] = inputs
        return self._graphed(padded)[:rows]

    def _build(self, inputs):
        shape = tuple(inputs.shape)
        logging.getLogger().info(f"Capturing the training forward and backward as CUDA graphs for batches of shape {shape}")
        try:
            with capture_lock, _while_building():
                self._graphed = torch.cuda.make_graphed_callables(self._module, (inputs.detach().clone(),),
                                                                  allow_unused_input=True)
        except Exception as error:
            # A failed capture can leave the CUDA generator and context unusable: stop here, with the way out.
            self._failed = True
            raise RuntimeError(f"CUDA graph capture of the training step failed ({type(error).__name__}: {error}). "
                               "Train without it: cuda_graph: false (--cuda_graph=False).") from error
        self._shape = shape
