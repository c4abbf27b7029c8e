"""Parameter counts per component, computed with jax.eval_shape (nothing is allocated).

    python -m dream_jax.models.param_count            # B, L, H, G
    python -m dream_jax.models.param_count tiny B     # chosen sizes

Counts exclude the frozen VAE and T5 (they are not part of DreamModel).
"""
import sys

import jax
import numpy as np

from dream_jax.models.dream import DreamModel, dummy_inputs
from dream_jax.models.sizes import PAPER_TOTALS, make_arch

COMPONENTS = ("encoder", "decoder", "aligner", "diffusion_head", "text_tower", "contrastive_head",
              "logit_scale")


def abstract_params(arch):
    """Shapes of all parameters of a DreamModel with this architecture."""
    model = DreamModel(arch)
    variables = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, *dummy_inputs(arch, 2), method=DreamModel.init_all))
    return variables["params"]


def count_by_component(arch):
    params = abstract_params(arch)
    counts = {}
    for name in COMPONENTS:
        leaves = jax.tree.leaves(params[name]) if name in params else []
        counts[name] = int(sum(np.prod(x.shape) for x in leaves))
    counts["total"] = sum(counts.values())
    return counts


def main(argv):
    sizes = argv[1:] or ["B", "L", "H", "G"]
    header = f"{'size':<5}" + "".join(f"{c:>18}" for c in COMPONENTS) + f"{'total':>16}{'paper':>10}"
    print(header)
    for size in sizes:
        counts = count_by_component(make_arch(size))
        paper = PAPER_TOTALS.get(size)
        row = f"{size:<5}" + "".join(f"{counts[c] / 1e6:>17.2f}M" for c in COMPONENTS)
        row += f"{counts['total'] / 1e9:>15.3f}B"
        row += f"{paper / 1e9:>9.2f}B" if paper else f"{'-':>10}"
        print(row)


if __name__ == "__main__":
    main(sys.argv)
