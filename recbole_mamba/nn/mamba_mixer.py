"""The Mamba block ("mixer") with two interchangeable backends.

Parameters have the names, shapes and initialisation of ``mamba_ssm.Mamba`` (in_proj, conv1d,
x_proj, dt_proj, A_log, D, out_proj), so a state dict moves between machines and backends:

- ``cuda``: mamba-ssm's fused kernels (``mamba_inner_fn`` with causal-conv1d; without causal-conv1d,
  mamba-ssm's CUDA selective scan after a plain convolution), or the same block with the Triton
  selective scan of :mod:`recbole_mamba.nn.triton_scan` (``scan_kernel``: ``auto`` times both on the
  first batch of each shape and keeps the faster, ``mamba_ssm`` or ``triton`` force one). Needs a CUDA
  tensor. With ``recompute_scan_inputs``, the Triton block's training backward recomputes the scan's
  inputs instead of holding them (:mod:`recbole_mamba.nn.triton_mixer`): less memory, a slower step.
- ``torch``: a pure-PyTorch path with :func:`recbole_mamba.nn.selective_scan.selective_scan`,
  which runs anywhere.

The backend is chosen once, by :func:`resolve_backend`, when the module is built.
"""

import importlib.metadata
import logging
import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mamba.errors import UserInputError
from recbole_mamba.nn import cuda_graph
from recbole_mamba.nn.selective_scan import selective_scan

BACKENDS = ("auto", "cuda", "torch")
SCAN_KERNELS = ("auto", "mamba_ssm", "triton")


def _load_cuda_kernels():
    """Import mamba-ssm's kernels; return (ops, reason they are unusable or None)."""
    try:
        from mamba_ssm.ops import selective_scan_interface as interface
    except ImportError as e:
        return None, f"mamba-ssm is not importable ({e}); install it with: pip install -e .[gpu]"
    # mamba_inner_fn fuses the convolution too, through causal-conv1d's compiled functions.
    fused = getattr(interface, "causal_conv1d_fwd_function", None) is not None
    ops = {"mamba_inner_fn": interface.mamba_inner_fn, "selective_scan_fn": interface.selective_scan_fn,
           "causal_conv1d_fn": getattr(interface, "causal_conv1d_fn", None)}
    try:
        from recbole_mamba.nn.triton_mixer import mixer_with_recomputation
        from recbole_mamba.nn.triton_scan import selective_scan_triton
    except ImportError:  # triton ships with torch's CUDA builds; without it only mamba-ssm's scan runs
        selective_scan_triton = mixer_with_recomputation = None
    return {**ops, "fused": fused, "triton": selective_scan_triton, "triton_mixer": mixer_with_recomputation}, None


def check_scan_kernel(scan_kernel):
    """Refuse a ``scan_kernel`` setting that is not one of SCAN_KERNELS, naming the valid ones."""
    if scan_kernel not in SCAN_KERNELS:
        raise UserInputError(f"scan_kernel must be one of {', '.join(SCAN_KERNELS)}, got {scan_kernel!r}.")


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def resolve_backend(requested, device):
    """Pick the backend for a model on ``device``.

    Returns ``(backend, description)``. ``auto`` takes ``cuda`` when the device is a GPU and
    mamba-ssm imports, else ``torch``. Asking for ``cuda`` where it cannot run is an error that
    says what is missing.
    """
    if requested not in BACKENDS:
        raise UserInputError(f"mamba_backend must be one of {', '.join(BACKENDS)}, got {requested!r}.")
    device = torch.device(device)
    if requested == "torch":
        return "torch", "torch (pure-PyTorch selective scan), as configured"
    if device.type != "cuda" or not torch.cuda.is_available():
        reason = "the model runs on the CPU" if device.type != "cuda" else "torch sees no CUDA device"
        if requested == "cuda":
            raise UserInputError(
                f"mamba_backend=cuda needs a CUDA GPU, but {reason} (device {device}, "
                f"torch.cuda.is_available()={torch.cuda.is_available()}). "
                "Use mamba_backend=torch or auto to run the pure-PyTorch scan."
            )
        return "torch", f"torch (pure-PyTorch selective scan), because {reason}"
    kernels, reason = _load_cuda_kernels()
    if kernels is None:
        if requested == "cuda":
            raise UserInputError(f"mamba_backend=cuda is not available: {reason}.")
        return "torch", f"torch (pure-PyTorch selective scan), because {reason}"
    conv = (
        f"causal-conv1d {_version('causal-conv1d')}"
        if kernels["fused"]
        else "no causal-conv1d: plain Conv1d"
    )
    return "cuda", f"cuda (mamba-ssm {_version('mamba-ssm')} fused kernels, {conv})"


class MambaMixer(nn.Module):
    """One Mamba block: (batch, length, d_model) -> (batch, length, d_model), causal in length."""

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        backend="torch",
        scan_kernel="auto",
        recompute_scan_inputs=False,
    ):
        super().__init__()
        if backend not in ("cuda", "torch"):
            raise ValueError(f"backend must be 'cuda' or 'torch' (use resolve_backend), got {backend!r}")
        check_scan_kernel(scan_kernel)
        self.backend = backend
        self.scan_kernel = scan_kernel
        self.recompute_scan_inputs = recompute_scan_inputs
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, stored as log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self._init_dt(dt_min, dt_max, dt_init_floor)
        self._kernels = _load_cuda_kernels()[0] if backend == "cuda" else None
        if backend == "cuda" and scan_kernel == "triton" and self._kernels["triton"] is None:
            raise UserInputError("scan_kernel=triton needs the triton package (shipped with torch's CUDA "
                                 "builds); use scan_kernel=mamba_ssm or auto.")

    @torch.no_grad()
    def _init_dt(self, dt_min, dt_max, dt_init_floor):
        # As mamba-ssm: dt_proj's weight uniform in +-dt_rank^-0.5, and its bias set so that
        # softplus(bias) is log-uniform in [dt_min, dt_max].
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden_states):
        if self.backend == "cuda":
            if not hidden_states.is_cuda:
                raise RuntimeError(
                    "This Mamba block was built for the cuda backend but got a CPU tensor; "
                    "rebuild the model with mamba_backend=torch (or auto) to run on the CPU."
                )
            return self._forward_cuda(hidden_states)
        return self._forward_torch(hidden_states)

    def _forward_torch(self, hidden_states):
        return self._forward_unfused(hidden_states, selective_scan)

    def _forward_unfused(self, hidden_states, scan):
        """in_proj -> causal conv -> ``scan`` (selective_scan_fn's arguments) -> out_proj, step by step."""
        u, delta, A, B, C, D, z, delta_bias = self.scan_operands(hidden_states)
        y = scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    def scan_operands(self, hidden_states):
        """The selective scan's inputs for this block's input: ``(u, delta, A, B, C, D, z, delta_bias)``
        (delta before its bias and softplus), in selective_scan_fn's layouts."""
        u, z = self.convolution_stage(hidden_states)
        delta, A, B, C, D, delta_bias = self.selection_stage(u)
        return u, delta, A, B, C, D, z, delta_bias

    def convolution_stage(self, hidden_states):
        """in_proj, then the causal convolution + SiLU of its first half: ``(u, z)``, (b, d_inner, l)."""
        length = hidden_states.shape[1]
        # Split along the last axis and transpose the halves (not the other way round): the gradient
        # of the split is then (b, l, 2 * d_inner) with channels contiguous, as in_proj's backward
        # needs it, instead of a transposed tensor that would be copied.
        x, z = (half.transpose(1, 2) for half in self.in_proj(hidden_states).chunk(2, dim=-1))  # (b, d_inner, l)
        conv_fn = self._kernels and self._kernels["causal_conv1d_fn"]
        if conv_fn is not None and x.is_cuda:
            if length == 1 or self.d_inner % 8:
                # causal-conv1d sends this channel-last input to its channel-last kernels, which need
                # a width and the gradient's batch and length strides that are multiples of 8; at
                # length 1 that gradient's length stride is 1. Give them the channel-first layout.
                x = x.contiguous()
            # causal-conv1d's fused convolution + SiLU, float32 weights, output in x's dtype.
            return conv_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"), z
        # As causal-conv1d inside mamba_inner_fn: float32 weights and arithmetic, output in x's
        # dtype, so that under autocast both backends round at the same places.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.silu(self.conv1d(x.float())[..., :length]).to(x.dtype), z

    def selection_stage(self, u):
        """From the convolved u (b, d, l), the rest of the scan's inputs: ``(delta, A, B, C, D,
        delta_bias)``, delta (b, d, l) without its bias, B and C (b, n, l)."""
        x_dbl = self.x_proj(u.transpose(1, 2))  # (b, l, dt_rank + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias goes in as delta_bias
        return (delta, -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
                self.dt_proj.bias.float())

    def _forward_triton(self, hidden_states):
        """The block with the Triton scan; with ``recompute_scan_inputs``, in training, through
        :mod:`recbole_mamba.nn.triton_mixer`, which holds less memory for the backward."""
        if self.recompute_scan_inputs and torch.is_grad_enabled():
            return self._kernels["triton_mixer"](self, hidden_states)
        return self._forward_unfused(hidden_states, self._kernels["triton"])

    def _forward_cuda(self, hidden_states):
        if self._scan_kernel_for(hidden_states) == "triton":
            return self._forward_triton(hidden_states)
        return self._forward_mamba_ssm(hidden_states)

    def _scan_kernel_for(self, hidden_states):
        """The scan kernel for this input's shape: the configured one, or under ``auto`` the faster one."""
        if forced := self._forced_scan_kernel():
            return forced
        training = torch.is_grad_enabled()
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        batch, length, _ = hidden_states.shape
        key = self._measurement_key(batch, length, hidden_states.dtype, autocast, training)
        if key not in _FASTER_SCAN_KERNEL:
            _FASTER_SCAN_KERNEL[key] = self._time_scan_kernels(hidden_states, training, key)
        return _FASTER_SCAN_KERNEL[key]

    def _forced_scan_kernel(self):
        """The scan kernel that runs whatever the shape, or None where ``auto`` measures per shape."""
        if self.scan_kernel == "auto" and self._kernels["triton"] is not None:
            return None
        return "triton" if self.scan_kernel == "triton" else "mamba_ssm"

    def _measurement_key(self, batch, length, dtype, autocast, training):
        # One measurement per power-of-two bucket of batch size and length: evaluation batches trimmed
        # to their longest sequence have many different lengths.
        return (_power_of_two_at_least(batch), _power_of_two_at_least(length), self.in_proj.in_features, dtype,
                autocast, training, self.d_inner, self.d_state, self.conv1d.kernel_size[0], self.dt_rank,
                self.recompute_scan_inputs)

    def scan_kernel_chosen(self, batch, length, training, dtype=torch.float32, autocast=None):
        """The scan kernel this block runs for inputs of ``batch`` x ``length`` (None where ``auto``
        has not measured that shape yet; "torch" on the torch backend)."""
        if self.backend != "cuda":
            return "torch"
        return self._forced_scan_kernel() or _FASTER_SCAN_KERNEL.get(
            self._measurement_key(batch, length, dtype, autocast, training))

    def _time_scan_kernels(self, hidden_states, training, key):
        """Time this block with each scan kernel on a random input of the same shape; return the faster."""
        generator = torch.Generator(device=hidden_states.device).manual_seed(0)  # the model's RNG is untouched
        probe = torch.randn(hidden_states.shape, generator=generator, device=hidden_states.device,
                            dtype=hidden_states.dtype)
        params = [p for p in self.parameters() if p.requires_grad]
        forwards = {"mamba_ssm": self._forward_mamba_ssm,
                    "triton": self._forward_triton}

        def step(forward):
            x = probe.detach().requires_grad_(training)
            out = forward(x)
            if training:  # gradients returned, not accumulated: the parameters' .grad stays as it was
                torch.autograd.grad(out, [x, *params], torch.ones_like(out))

        # Inside a CUDA graph the host's launch costs vanish: compare the kernels' GPU time alone.
        as_graph = cuda_graph.building()
        timer = median_graph_ms if as_graph else median_cuda_ms
        ms = {}
        for name, forward in forwards.items():
            ms[name] = timer(lambda: step(forward))
            # The probe's activations and graph pool stay cached by the allocator, in blocks the model's
            # own stream and pools do not reuse: hand them back, or they add to the run's peak memory.
            torch.cuda.empty_cache()
        choice = min(ms, key=ms.get)
        batch, length, _ = hidden_states.shape
        logging.getLogger().info(
            f"Mamba scan kernel for batch {batch} x length {length} ({'training' if training else 'inference'}; "
            f"kept for batches up to {key[0]} x lengths up to {key[1]}): "
            f"{choice} (block forward{' + backward' if training else ''}{' as a CUDA graph' if as_graph else ''}: "
            f"mamba-ssm {ms['mamba_ssm']:.2f} ms, triton {ms['triton']:.2f} ms)")
        return choice

    def _forward_mamba_ssm(self, hidden_states):
        if not self._kernels["fused"]:  # no causal-conv1d: a plain Conv1d, then mamba-ssm's CUDA scan
            return self._forward_unfused(hidden_states, _contiguous_inputs(self._kernels["selective_scan_fn"]))
        # xz as mamba-ssm's Mamba computes it: (2 * d_inner, batch * length) reshaped to
        # (batch, 2 * d_inner, length) with length contiguous, so mamba_inner_fn needs no copy and
        # its gradient comes back in the layout in_proj's backward GEMMs read directly.
        batch, length, _ = hidden_states.shape
        xz = (self.in_proj.weight @ hidden_states.reshape(batch * length, -1).t()).view(-1, batch, length)
        return self._kernels["mamba_inner_fn"](
            xz.permute(1, 0, 2),
            self.conv1d.weight,
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.out_proj.weight,
            self.out_proj.bias,
            -torch.exp(self.A_log.float()),
            None,
            None,
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )


# (batch and length buckets, dtypes, training, block shape) -> the faster scan kernel, measured once per process.
_FASTER_SCAN_KERNEL = {}


def _power_of_two_at_least(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def median_cuda_ms(fn, warmup=2, reps=5):
    """Median milliseconds of ``fn`` on the current CUDA stream (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):  # the first call also compiles the Triton kernels for this shape
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_graph_ms(fn, reps=5):
    """Median milliseconds of ``fn`` captured once as a CUDA graph and replayed: its GPU time without
    the host's cost of launching its kernels one by one."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # first calls (Triton compilation, lazy initialisation) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_cuda_ms(graph.replay, warmup=1, reps=reps)


def _contiguous_inputs(scan):
    """``scan`` with its tensor arguments made contiguous, as mamba-ssm's CUDA kernel needs."""

    def call(*tensors, z, **kwargs):
        return scan(*(t.contiguous() for t in tensors), z=z.contiguous(), **kwargs)

    return call
