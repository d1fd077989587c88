"""Checks what the README's Quickstart and toy commands wrote (run by .ci/readme_commands).

Usage: python .ci/check_readme_outputs.py OUT, where OUT holds cfg_digits/, cfg_toy2d/,
fig2.png and inspect.txt (the output of `tensorboard --inspect`). The numbers are read
back with tools that are not ours (TensorBoard's event reader, PIL, numpy, json).
"""

import json
import pathlib
import sys

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util


def check(condition, message):
  if not condition:
    sys.exit(f"README outputs: {message}")
  print(f"ok: {message}")


def loss_curve(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  acc.Reload()
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")}


def main(out):
  digits = out / "cfg_digits"
  check((digits / "checkpoints" / "3000").is_dir(), "digits checkpoint at step 3000")
  for name in ("step_00001000.png", "step_00003000.png"):
    check((digits / "grids" / name).is_file(), f"grids/{name}")
  for w in ("0", "0.5", "1", "2", "4"):
    with np.load(digits / "samples" / f"step_3000_w{w}.npz") as f:
      images = f[f.files[0]]
    check(len(images) == 100 and np.isfinite(images).all(), f"100 finite samples at w={w}")

  loss = loss_curve(digits)
  check(max(loss) == 3000 and loss[3000] < 0.25, f"final loss {loss[3000]:.3f} < 0.25")
  check(loss[3000] < loss[min(loss)], "loss fell during training")
  check("loss" in (out / "inspect.txt").read_text(), "tensorboard --inspect lists loss")

  results = json.loads((digits / "eval" / "3000" / "results.json").read_text())
  records = {r["w"]: r for r in results["records"]}
  check(sorted(records) == [0.0, 0.5, 1.0, 2.0, 4.0], f"sweep over w {sorted(records)}")
  check(records[0.0]["accuracy"] >= 0.9, f"w=0 accuracy {records[0.0]['accuracy']} >= 0.9")
  check(records[4.0]["accuracy"] >= records[0.0]["accuracy"], "accuracy rises with w")
  check(records[4.0]["fid"] > records[0.0]["fid"], "the FID stand-in rises with w")
  for name in ("results.md", "results.csv", "fid_vs_is.png"):
    check((digits / "eval" / "3000" / name).is_file(), f"eval/3000/{name}")

  check((digits / "noisy_classifier" / "checkpoints" / "500").is_dir(),
        "noisy classifier checkpoint at step 500")
  compare = digits / "eval" / "compare" / "3000"
  rows = {(r["rule"], r["strength"]): r
          for r in json.loads((compare / "results.json").read_text())["records"]}
  rules = ("cfg", "classifier", "cfg_rescale", "apg", "autoguidance")
  check(sorted(rows) == sorted((r, s) for r in rules for s in (0.0, 1.0, 4.0)),
        "the comparison has every rule at every strength")
  for rule in rules[1:]:  # Strength 0 is the conditional model for every rule.
    fid, cfg_fid = rows[rule, 0.0]["fid"], rows["cfg", 0.0]["fid"]
    check(abs(fid - cfg_fid) <= 1e-3 * cfg_fid, f"{rule} at 0 = cfg at w=0 ({fid:.4f})")
  for name in ("fid_vs_is.png", "accuracy_vs_diversity.png", "results.md"):
    check((compare / name).is_file(), f"eval/compare/3000/{name}")

  for path in (out / "fig2.png", out / "cfg_toy2d" / "samples" / "step_3000_fig2.png"):
    with Image.open(path) as image:
      check(min(image.size) > 200, f"{path.name} is a {image.size} picture")
  check((out / "cfg_toy2d" / "checkpoints" / "3000").is_dir(), "toy2d checkpoint at 3000")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
