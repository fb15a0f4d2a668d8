"""The element-wise parts of a Mamba4Rec layer and its embedding backward: plain PyTorch against the
plugin's fused versions (:mod:`recbole_mamba.nn.fused`, :mod:`recbole_mamba.nn.embedding`).

Forward + backward, float32, on one GPU, at an ml-1m prefix batch (2048 sequences x 200 items,
hidden 64) and a lifelong batch (32 windows x 2048 items):

- ``dropout + add + LayerNorm``: ``LayerNorm(dropout(x) + residual)``, as after a Mamba block or FFN;
- ``dropout + LayerNorm``: the same without the residual, as after the item embedding;
- ``GELU + dropout``: inside the FFN (inner size 4 x 64);
- ``embedding``: the item lookup, with nn.Embedding's backward or index_add_;

and at two more lifelong batch sizes, to place ``fused.MIN_FUSED_ROWS`` (the fused versions are
timed at every size here).

Each timing is the median (CUDA events) over ``--reps`` repetitions of 10 back-to-back calls, after
warm-up (which includes compilation), divided by 10, so the host's launch work overlaps the GPU's as
in training. Writes benchmarks/results/fused_ops.{json,md}.

    python benchmarks/fused_ops.py [--reps 20]
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from recbole_mamba.nn import fused  # noqa: E402
from recbole_mamba.nn.embedding import embedding_lookup  # noqa: E402
from recbole_mamba.nn.fused import dropout_add_layer_norm, gelu_dropout  # noqa: E402
from recbole_mamba.nn.mamba_mixer import median_cuda_ms  # noqa: E402

SHAPES = {"ml-1m prefix batch": (2048, 200), "lifelong batch": (32, 2048), "64 x 2048": (64, 2048),
          "128 x 2048": (128, 2048)}
HIDDEN, P, ITEMS = 64, 0.2, 3417
CALLS = 10


def cases(batch, length):
    """{name: (plain, fused)}: zero-argument functions running forward + backward once."""
    dropout, norm = nn.Dropout(P).cuda(), nn.LayerNorm(HIDDEN, eps=1e-12).cuda()
    x = torch.randn(batch, length, HIDDEN, device="cuda", requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    wide = torch.randn(batch, length, 4 * HIDDEN, device="cuda", requires_grad=True)
    embedding = nn.Embedding(ITEMS, HIDDEN, padding_idx=0).cuda()
    lengths = torch.randint(1, length + 1, (batch,), device="cuda")
    items = torch.randint(1, ITEMS, (batch, length), device="cuda")
    items = torch.where(torch.arange(length, device="cuda") < lengths[:, None], items, 0)  # right padding
    upstream, upstream_wide = torch.randn_like(x), torch.randn_like(wide)

    def run(function, grad):
        return lambda: function().backward(grad)

    return {
        "dropout + add + LayerNorm": (run(lambda: norm(dropout(x) + residual), upstream),
                                      run(lambda: dropout_add_layer_norm(x, residual, dropout, norm), upstream)),
        "dropout + LayerNorm": (run(lambda: norm(dropout(x)), upstream),
                                run(lambda: dropout_add_layer_norm(x, None, dropout, norm), upstream)),
        "GELU + dropout": (run(lambda: dropout(F.gelu(wide)), upstream_wide),
                           run(lambda: gelu_dropout(wide, dropout), upstream_wide)),
        "embedding": (run(lambda: embedding(items), upstream),
                      run(lambda: embedding_lookup(items, embedding), upstream)),
    }


def per_call_ms(function, reps):
    def calls():
        for _ in range(CALLS):
            function()
    return median_cuda_ms(calls, warmup=3, reps=reps) / CALLS


def main():
    args, env = _report.gpu_benchmark_start(__doc__)
    fused.MIN_FUSED_ROWS = 0  # the compiled versions at every size, to find where they pay
    rows = []
    for shape_name, (batch, length) in SHAPES.items():
        for op, (plain_version, fused_version) in cases(batch, length).items():
            row = {"shape": shape_name, "batch": batch, "length": length, "op": op,
                   "plain_ms": per_call_ms(plain_version, args.reps), "fused_ms": per_call_ms(fused_version, args.reps)}
            rows.append(row)
            print(row, flush=True)
    lines = ["| batch | op | PyTorch ms | fused ms | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['batch']} x {r['length']} x {HIDDEN}) | {r['op']} | {r['plain_ms']:.3f} | "
                     f"{r['fused_ms']:.3f} | {r['fused_ms'] / r['plain_ms']:.2f}x |")
    _report.write("fused_ops", env, {"rows": rows}, "\n".join(lines), notes=(
        f"Forward + backward, float32, dropout {P}, training mode. Median over {args.reps} repetitions of "
        f"{CALLS} back-to-back calls (CUDA events), divided by {CALLS}; warm-up (and compilation) before. "
        "Fused: torch.compile of the same operations (recbole_mamba.nn.fused); embedding: index_add_ "
        "backward (recbole_mamba.nn.embedding)."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
