"""Quality per network evaluation: a trained run's guidance sweep drawn by each sampler at
a few budgets of network evaluations (NFE; one = one call on the 2N batch), against
ancestral sampling at T = 256.

  python -m bench.solvers --workdir=/tmp/cfg_digits [--num_samples=1000] [--quick]

writes WORKDIR/solvers/{results.json, table.md, fid_vs_nfe.png}. Every configuration draws
the same examples (example i from fold_in(key(eval.seed), i), label i mod classes), so the
comparison is paired: the deterministic solvers start from the same noise. The metrics
are the run's evaluation (`--mode=evaluate`'s extractor and reference statistics): for
the digits, FID of a small classifier's features, a stand-in for Inception's.
"""

import argparse
import json
import logging
import time

from etils import epath
import numpy as np

from cfg_guidance import api, files, generate, sampling
from cfg_guidance.evaluation import sweep

WEIGHTS = (0.0, 1.0, 2.0, 4.0)
BUDGETS = (8, 16, 25, 50)
SOLVERS = ("ddim", "dpmpp_2m", "unipc", "heun")
GRIDS = ("u", "logsnr")
BASELINE = ("ancestral", "u", 256)
# EDM's σ range for VP models, σ/α in [0.002, 80], as λ = −2 log(σ/α): Heun's steps are
# taken in σ/α, which spans e^±10 over the default λ in [−20, 20].
EDM_RANGE = (-2 * np.log(80.0), -2 * np.log(0.002))


def steps_for(sampler: str, budget: int) -> int:
  """The most grid points whose NFE fits the budget (heun: 2N − 1 <= budget)."""
  per = sampling.SOLVERS[sampler].evaluations_per_step
  return max(1, (budget - 1) // per + 1)


def configurations(budgets, solvers, grids):
  """(sampler, grid, num_steps, λ range or None for the run's) to run: baseline first;
  Heun also on EDM's range."""
  out = [BASELINE + (None,)]
  for sampler in solvers:
    for grid in grids:
      out += [(sampler, grid, steps_for(sampler, b), None) for b in budgets]
  if "heun" in solvers:
    out += [("heun", "logsnr", steps_for("heun", b), EDM_RANGE) for b in budgets]
  return out


def _name(record: dict) -> str:
  return record["sampler"] + (" (EDM's λ range)" if record["logsnr_range"] else "")


def run(workdir: str, *, num_samples: int, weights=WEIGHTS, budgets=BUDGETS,
        solvers=SOLVERS, grids=GRIDS, out_dir: str | None = None) -> list[dict]:
  """Measures every configuration at every weight; writes and returns the records."""
  model = api.load(workdir)
  config = model.config.copy_and_resolve_references()
  config.eval.num_samples = num_samples
  config.eval.precision_recall = False
  evaluation = sweep.Evaluation(config, workdir)
  base = evaluation.settings
  out = epath.Path(out_dir) if out_dir else epath.Path(workdir) / "solvers"
  records = []
  try:
    for sampler, grid, num_steps, logsnr_range in configurations(budgets, solvers, grids):
      settings = base.replace(sampler=sampler, grid=grid, num_steps=num_steps)
      if logsnr_range:
        settings = settings.replace(logsnr_min=float(logsnr_range[0]),
                                    logsnr_max=float(logsnr_range[1]))
      for w in weights:
        start = time.time()
        metrics = evaluation.weight_metrics(model.eps_fn, float(w), settings)
        record = dict(sampler=sampler, grid=grid, num_steps=num_steps,
                      nfe=settings.num_evaluations, w=float(w),
                      logsnr_range=[float(v) for v in logsnr_range] if logsnr_range
                      else None,
                      seconds=time.time() - start,
                      **{k: v for k, v in metrics.items() if k != "w"})
        logging.info("%s", record)
        print(f"{_name(record):9s} {grid:6s} N={num_steps:3d} NFE={record['nfe']:3d} w={w:g}: "
              f"FID {record['fid']:.3f} ({record['seconds']:.1f} s)", flush=True)
        records.append(record)
      # After each configuration, so that an interrupted run keeps what it measured.
      write(out, records, step=model.step, num_samples=num_samples,
            extractor=evaluation.extractor.name, clip_x=base.clip_x)
  finally:
    evaluation.close()
  return records


def rows(records: list[dict]) -> list[dict]:
  """One row per (sampler, grid, NFE) in run order: FID per weight and `worst`, the
  largest ratio of its FID to the baseline's over the weights."""
  base = {r["w"]: r["fid"] for r in records if (r["sampler"], r["grid"], r["num_steps"])
          == BASELINE}
  grouped = {}
  for r in records:
    grouped.setdefault((_name(r), r["grid"], r["nfe"]), {})[r["w"]] = r["fid"]
  return [dict(sampler=sampler, grid=grid, nfe=nfe, fids=fids,
               worst=max(fids[w] / base[w] for w in base))
          for (sampler, grid, nfe), fids in grouped.items()]


def table(records: list[dict]) -> str:
  """Markdown: `rows`, FID per weight and the worst ratio to ancestral."""
  weights = sorted({r["w"] for r in records})
  lines = ["| sampler | grid | NFE | " + " | ".join(f"FID w={w:g}" for w in weights)
           + " | worst FID / ancestral |",
           "|:--|:--|--:|" + "--:|" * len(weights) + "--:|"]
  for row in rows(records):
    lines.append(f"| {row['sampler']} | {row['grid']} | {row['nfe']} | "
                 + " | ".join(f"{row['fids'][w]:.3f}" for w in weights)
                 + f" | {row['worst']:.3f} |")
  return "\n".join(lines) + "\n"


def best_within(records: list[dict], max_nfe: int) -> dict | None:
  """The row with NFE <= max_nfe (baseline excluded) whose worst ratio is least."""
  fast = [row for row in rows(records)
          if row["nfe"] <= max_nfe and row["sampler"] != BASELINE[0]]
  return min(fast, key=lambda row: row["worst"], default=None)


def plot(records: list[dict]) -> bytes:
  """FID against NFE, one panel per weight, a line per (sampler, grid); the baseline
  dashed."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  weights = sorted({r["w"] for r in records})
  fig = figure.Figure(figsize=(3.2 * len(weights), 3.2), dpi=100, layout="constrained")
  axes = fig.subplots(1, len(weights), squeeze=False)[0]
  for ax, w in zip(axes, weights):
    at_w = [r for r in records if r["w"] == w]
    for r in at_w:
      if (r["sampler"], r["grid"], r["num_steps"]) == BASELINE:
        ax.axhline(r["fid"], color="k", ls="--", lw=1, label=f"ancestral T={r['nfe']}")
    for sampler in dict.fromkeys(_name(r) for r in at_w if r["sampler"] != "ancestral"):
      for grid in dict.fromkeys(r["grid"] for r in at_w):
        line = sorted((r["nfe"], r["fid"]) for r in at_w
                      if _name(r) == sampler and r["grid"] == grid)
        if line:
          ax.plot(*zip(*line), marker="o", ms=3, ls="-" if grid == "u" else ":",
                  label=f"{sampler} ({grid})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations")
    ax.set_title(f"w = {w:g}", fontsize=9)
  axes[0].set_ylabel("FID (stand-in)")
  axes[-1].legend(fontsize=6)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def write(out: epath.Path, records: list[dict], **metadata) -> None:
  out.mkdir(parents=True, exist_ok=True)
  files.atomic_write_bytes(out / "results.json",
                           json.dumps(dict(metadata, records=records), indent=1).encode())
  files.atomic_write_bytes(out / "table.md", table(records).encode())
  files.atomic_write_bytes(out / "fid_vs_nfe.png", plot(records))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="A trained run's workdir.")
  parser.add_argument("--num_samples", type=int, default=1000, help="Samples per weight.")
  parser.add_argument("--out", default=None, help="Default: WORKDIR/solvers.")
  parser.add_argument("--quick", action="store_true",
                      help="Two weights, two budgets, the logsnr grid, 200 samples.")
  args = parser.parse_args(argv)
  kwargs = {}
  if args.quick:
    kwargs = dict(weights=(0.0, 4.0), budgets=(8, 16), grids=("logsnr",))
    args.num_samples = min(args.num_samples, 200)
  records = run(args.workdir, num_samples=args.num_samples, out_dir=args.out, **kwargs)
  print(table(records))
  print("best at <= 25 evaluations:", best_within(records, 25))


if __name__ == "__main__":
  main()
