"""The paper's Figure 2: exact guided densities of the three-Gaussian toy problem, and
samples drawn with exact (and learned) scores.

Render it with `python -m cfg_guidance.toy --out fig2.png`; the problem itself is
`cfg_guidance.data.toy2d`.
"""

import argparse
import io
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from cfg_guidance import files, generate, sampling
from cfg_guidance.data import toy2d

def sampler_settings(num_steps: int = 256, **changes) -> generate.Settings:
  """The toy problem's sampler: 2-D points, nothing to clip, every point in one call."""
  return generate.Settings(shape=(2,), null_label=toy2d.NULL_LABEL, num_steps=num_steps,
                           clip_x="none", batch_size=2**20).replace(**changes)


def guided_samples(eps_fn, weights: Sequence[float], num_per_class: int, *,
                   settings: generate.Settings, seed: int = 0) -> np.ndarray:
  """Samples of every (w, class) pair, drawn together: [len(weights), C, n, 2]."""
  labels, w = generate.grid_layout(np.repeat(np.arange(toy2d.NUM_CLASSES), num_per_class),
                                   weights, per_class=1)
  x = generate.draw(eps_fn, labels, w, settings=settings, seed=seed)
  return x.reshape(len(weights), toy2d.NUM_CLASSES, num_per_class, 2)


def render_figure(path, *, weights: Sequence[float] = (0.0, 1.0, 3.0, 8.0),
                  eps_fns: Mapping[str, sampling.EpsFn] | None = None,
                  num_per_class: int = 1000, settings: generate.Settings | None = None,
                  seed: int = 0, grid_size: int = 200, dpi: int = 80,
                  panel_inches: float = 3.0) -> None:
  """Writes Figure 2 to `path` (PNG): exact guided densities, then a row of samples per
  eps_fn, each row from the same noise (seed).

  eps_fns maps a row title to an eps_fn (default: the exact scores); a trainer passes
  `{"exact scores": toy2d.exact_eps, "learned": its_eps_fn}` to compare. `settings`:
  the sampler (default `sampler_settings()`; a learned model's λ range goes there). The image is
  (1 + len(eps_fns)) * panel_inches * dpi high and len(weights) * panel_inches * dpi wide.
  """
  from matplotlib import figure  # pylint: disable=g-import-not-at-top

  if eps_fns is None:
    eps_fns = {"exact scores": toy2d.exact_eps}
  settings = settings or sampler_settings()
  colors = ("tab:blue", "tab:orange", "tab:green")
  rows, cols = 1 + len(eps_fns), len(weights)
  fig = figure.Figure(figsize=(cols * panel_inches, rows * panel_inches), dpi=dpi,
                      layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  for j, w in enumerate(weights):
    densities, axis = toy2d.guided_density(w, grid_size=grid_size)
    axes[0, j].pcolormesh(axis, axis, densities.mean(0), cmap="viridis", shading="auto")
    axes[0, j].set_title(f"exact p(x|c) p(c|x)^w, w={w:g}", fontsize=8)
  for i, (name, eps_fn) in enumerate(eps_fns.items(), start=1):
    x = guided_samples(eps_fn, weights, num_per_class, settings=settings, seed=seed)
    for j, w in enumerate(weights):
      for c in range(toy2d.NUM_CLASSES):
        axes[i, j].scatter(x[j, c, :, 0], x[j, c, :, 1], s=1, alpha=0.4, c=colors[c])
      axes[i, j].set_title(f"{name}, w={w:g}", fontsize=8)
  for ax in axes.ravel():
    ax.set_xlim(-toy2d.EXTENT, toy2d.EXTENT)
    ax.set_ylim(-toy2d.EXTENT, toy2d.EXTENT)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
  if jax.process_index() == 0:  # Every process drew the samples (a collective).
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    files.atomic_write_bytes(path, buf.getvalue())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", required=True, help="Output PNG path.")
  parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 3.0, 8.0])
  parser.add_argument("--num_per_class", type=int, default=1000)
  parser.add_argument("--num_steps", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  render_figure(args.out, weights=args.weights, num_per_class=args.num_per_class,
                settings=sampler_settings(args.num_steps), seed=args.seed)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
