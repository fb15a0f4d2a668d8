"""A Mamba block's training forward with the Triton scan that keeps only its input and the scan's
output for the backward, and recomputes the rest there.

Step by step under autograd, a block holds for its backward the in_proj output (2 x d_inner values a
position), the convolution's output (d_inner), x_proj's output and delta (d_inner): about 550 floats
a position at d_inner 128, d_state 32, more than the rest of the layer (LayerNorms, feed-forward)
together. They are cheap to recompute (three small matrix products, a depthwise convolution), and
the backward visits one block at a time, so recomputing them there leaves one block's worth alive
instead of every block's. On an H100 at 32 windows of 2,048 and 2 layers, with CUDA graphs, the
step held 1.20 instead of 1.48 GiB and took 10.4 instead of 9.8 ms (benchmarks/NOTES.md, lifelong
row 11): an option, ``recompute_scan_inputs``, off by default. The scan's output (what out_proj's
weight gradient needs) is kept: recomputing it would repeat the scan.

:class:`MixerWithRecomputation` is an autograd Function over the block's input and parameters. Its
twin is the block run step by step (``MambaMixer._forward_unfused`` with the Triton scan), which
``tests/test_triton_mixer.py`` compares it against: output and every gradient.
"""

import torch
import torch.nn.functional as F

from recbole_mamba.nn.triton_scan import ScanSaved, scan_backward, scan_forward


def _convolution_parameters(mixer):
    return [mixer.in_proj.weight, mixer.conv1d.weight, mixer.conv1d.bias]


def _selection_parameters(mixer):
    return [mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.A_log, mixer.D]


def _grads(outputs, output_grads, inputs):
    """torch.autograd.grad of the ``outputs`` that take part in autograd, None for an unused input."""
    pairs = [(t, g) for t, g in zip(outputs, output_grads) if g is not None and t.requires_grad]
    return torch.autograd.grad([t for t, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


class MixerWithRecomputation(torch.autograd.Function):
    """Inputs: the block's input, the MambaMixer, out_proj's weight, then the parameters of the
    convolution stage and of the selection stage (see MambaMixer.scan_operands)."""

    # custom_fwd / custom_bwd: the backward recomputes under the forward's autocast state.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden_states, mixer, out_weight, *parameters):
        with torch.no_grad():
            operands = mixer.scan_operands(hidden_states)
            y, _, saved = scan_forward(*operands, delta_softplus=True)
            out = F.linear(y.transpose(1, 2), out_weight)
        ctx.mixer, ctx.launch = mixer, saved.launch
        ctx.save_for_backward(hidden_states, y, out_weight, saved.hloc, saved.sdt)  # summaries: None if unsegmented
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        hidden_states, y, out_weight, hloc, sdt = ctx.saved_tensors
        mixer = ctx.mixer
        n_conv = len(_convolution_parameters(mixer))
        wanted = ctx.needs_input_grad[3:]
        conv_wanted = [p for p, w in zip(_convolution_parameters(mixer), wanted[:n_conv]) if w]
        selection_wanted = [p for p, w in zip(_selection_parameters(mixer), wanted[n_conv:]) if w]
        # Recompute the scan's inputs in two stages: u is a leaf of the second, so that its two
        # gradients (from the scan and through x_proj) are added here, into the scan's u gradient,
        # whose layout causal-conv1d's backward accepts.
        with torch.enable_grad():
            hidden_states = hidden_states.detach().requires_grad_()
            u, z = mixer.convolution_stage(hidden_states)
            u_leaf = u.detach().requires_grad_()
            selection = mixer.selection_stage(u_leaf)
        delta, A, B, C, D, delta_bias = (t.detach() for t in selection)
        saved = ScanSaved(hloc, sdt, True, ctx.launch)
        # out_proj's backward: y is (batch, d_inner, L) stored as (batch, L, d_inner), as dy is made.
        dout_rows = dout.reshape(-1, dout.shape[-1])
        d_out_weight = dout_rows.t() @ y.transpose(1, 2).reshape(-1, y.shape[1]) if ctx.needs_input_grad[2] else None
        dy = (dout_rows @ out_weight).view(*dout.shape[:-1], -1).transpose(1, 2)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = scan_backward(saved, dy, u_leaf.detach(), delta, A, B, C, D,
                                                                    z.detach(), delta_bias)
        del dy, saved
        du_selection, *d_selection = _grads(selection, (ddelta, dA, dB, dC, dD, ddelta_bias),
                                            [u_leaf] + selection_wanted)
        if du_selection is not None:
            du.add_(du_selection)
        d_hidden, *d_conv = _grads((u, z), (du, dz), [hidden_states] + conv_wanted)
        d_conv, d_selection = iter(d_conv), iter(d_selection)
        d_parameters = ([next(d_conv) if w else None for w in wanted[:n_conv]]
                        + [next(d_selection) if w else None for w in wanted[n_conv:]])
        return (d_hidden if ctx.needs_input_grad[0] else None, None, d_out_weight, *d_parameters)


def mixer_with_recomputation(mixer, hidden_states):
    """``mixer`` (a MambaMixer, whose out_proj has no bias) on ``hidden_states`` with the Triton scan,
    recomputing in the backward everything before the scan."""
    return MixerWithRecomputation.apply(hidden_states, mixer, mixer.out_proj.weight, *_convolution_parameters(mixer),
                                        *_selection_parameters(mixer))
