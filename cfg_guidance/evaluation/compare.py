"""--mode=compare: the guidance family on one sweep.

The paper's claim is comparative: classifier-free guidance reaches classifier guidance's
FID/IS trade-off without a classifier (Fig. 4, Table 1). This job sweeps each rule of
`config.compare.rules` over `config.compare.strengths` with the evaluation's samples,
extractor, reference and sampler, and writes one table and two figures (FID against IS;
accuracy against diversity) into EVAL_DIR/compare/<step>/:

- cfg, cfg_rescale, apg: w, their parameters from `config.sample.<rule>_<name>`;
- autoguidance: w, the negative branch a weaker version of the same model (an earlier
  checkpoint of this run, or of `compare.autoguidance_workdir`), at the same labels;
- classifier: ADM-G, the scale s at w = 0, with the noisy classifier trained by
  `--mode=train_classifier`.
"""

import dataclasses
import logging
import math

import ml_collections
import numpy as np

from cfg_guidance import api, files, generate
from cfg_guidance import config as config_lib
from cfg_guidance.evaluation import report, sweep
from cfg_guidance.runtime import checkpointing

KEYS = ("fid", "is", "accuracy", "diversity")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every field the comparison reads, before any compute."""
  sweep.check_config(config)
  config_lib.check_fields(config, "compare")


def _weak_model(config, workdir, mesh) -> api.Model:
  """Autoguidance's negative branch: compare.autoguidance_step of the weak run's
  checkpoints (this run's unless compare.autoguidance_workdir), else its earliest."""
  c = config.compare
  weak_dir = c.autoguidance_workdir or workdir
  step = c.autoguidance_step
  if step is None:
    steps = checkpointing.Checkpointer(weak_dir, create=False).all_steps()
    if not steps:
      raise checkpointing.CheckpointError(
          f"config.compare.rules has 'autoguidance' but {weak_dir} has no checkpoint to "
          "use as its weak model (set config.compare.autoguidance_workdir or _step).")
    step = steps[0]
  return api.load(weak_dir, step, mesh=mesh)


def _networks(config, workdir, model: api.Model, mesh) -> dict:
  """{rule: the keyword arguments of its second network} for the rules that have one."""
  rules, networks = config.compare.rules, {}
  if "autoguidance" in rules:
    weak = _weak_model(config, workdir, mesh)
    for field in ("num_classes", "image_size", "channels"):  # Any size of network.
      if weak.config.model.get(field) != config.model.get(field):
        raise ValueError(f"Autoguidance's weak model {weak.path} has model.{field}="
                         f"{weak.config.model.get(field)}, this run "
                         f"{config.model.get(field)}: it must draw the same images.")
    if weak.step >= model.step and not config.compare.autoguidance_workdir:
      raise ValueError(f"config.compare.autoguidance_step={weak.step} must be below the "
                       f"evaluated step {model.step}: the weak model is an earlier, "
                       "less-trained checkpoint.")
    networks["autoguidance"] = dict(negative_eps_fn=weak.eps_fn)
    logging.info("Autoguidance: weak model %s.", weak.path)
  if "classifier" in rules:
    path = config_lib.classifier_workdir(config, workdir)
    classifier = api.load_classifier(path, mesh=mesh)
    networks["classifier"] = dict(classifier_fn=classifier.classifier_fn)
    logging.info("Classifier guidance: noisy classifier %s.", path)
  return networks


def _settings(config, base: generate.Settings, rule: str, strength: float
              ) -> tuple[float, generate.Settings]:
  """(w, the sampler) of `rule` at `strength`."""
  params = generate.rule_params(config.sample, rule)
  w = strength
  if rule == "classifier":  # ADM-G: classifier guidance alone.
    w, params = 0.0, {**params, "scale": strength}
  return w, dataclasses.replace(base, guidance=rule, guidance_params=params)


def run(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> list[dict]:
  """Sweeps every rule over compare.strengths on checkpoint eval.step (None: latest).

  Returns the records ({"rule", "strength", "w", metrics...}; [] off process 0).
  """
  check_config(config)
  evaluation = sweep.Evaluation(config, workdir, mesh)
  try:
    model = api.load(workdir, config.eval.step, mesh=evaluation.mesh)
    config_lib.check_same_model(config, model.config, str(model.path))
    networks = _networks(config, workdir, model, evaluation.mesh)
    records = []
    for rule in config.compare.rules:
      for strength in config.compare.strengths:
        w, settings = _settings(config, evaluation.settings, rule, float(strength))
        record = evaluation.weight_metrics(
            model.eps_fn, w, settings, progress=f"{rule} {_strength(rule, strength)}",
            **networks.get(rule, {}))
        if evaluation.is_chief:
          records.append({"rule": rule, "strength": float(strength), **record})
    if evaluation.is_chief:
      write(evaluation, model, records)
    return records
  finally:
    evaluation.close()


def write(evaluation: sweep.Evaluation, model: api.Model, records: list[dict]) -> None:
  """results.json/.md, fid_vs_is.png and accuracy_vs_diversity.png in compare/<step>/."""
  out = evaluation.out / "compare" / str(model.step)
  out.mkdir(parents=True, exist_ok=True)
  ev = evaluation.config.eval
  metadata = report.results_metadata(
      ev, evaluation.settings, step=model.step, extractor=evaluation.extractor,
      reference_path=evaluation.reference.path,
      reference_count=evaluation.reference.stats.count, checkpoint=model.path)
  # Each rule's own parameters; JSON has no infinity, so an unbounded one reads "inf".
  metadata["rules"] = {
      r: {k: v if math.isfinite(v) else str(v)
          for k, v in generate.rule_params(evaluation.config.sample, r).items()}
      for r in evaluation.config.compare.rules}
  files.atomic_write_bytes(out / "results.md", to_markdown(metadata, records).encode())
  files.atomic_write_bytes(out / "fid_vs_is.png", plot(metadata, records, "is", "fid"))
  files.atomic_write_bytes(out / "accuracy_vs_diversity.png",
                           plot(metadata, records, "diversity", "accuracy"))
  files.atomic_write_bytes(out / "results.json", report.to_json(metadata, records).encode())
  evaluation.writer.write_scalars(model.step, {
      f"compare/{r['rule']}/{metadata['metric_labels'][k]}/{r['strength']:g}": r[k]
      for r in records for k in KEYS if k in r})
  logging.info("Guidance comparison of step %d, written to %s:\n%s", model.step, out,
               to_markdown(metadata, records))


def to_markdown(metadata: dict, records: list[dict]) -> str:
  """One row per (rule, strength): Table 1's columns, the rule's own parameters."""
  labels, arrows = metadata["metric_labels"], dict(report.METRICS)
  columns = [k for k in KEYS if k in records[0]]
  lines = ["| Rule | Strength | " + " | ".join(f"{labels[c]} {arrows[c]}".rstrip()
                                               for c in columns) + " |",
           "|:--|--:|" + "--:|" * len(columns)]
  for r in records:
    strength = _strength(r["rule"], r["strength"]).replace("=", " = ")
    lines.append(f"| {_rule_label(r['rule'], metadata)} | {strength} | "
                 + " | ".join(report.format_cell(r, c) for c in columns) + " |")
  caption = (f"Step {metadata['step']}: {metadata['num_samples']} samples per row, "
             f"{metadata['sampler']} sampler, {metadata['num_evaluations']} network "
             f"evaluations; features: {metadata['extractor']}")
  if not metadata["comparable"]:
    caption += " (a stand-in network: not comparable with published FID/IS)"
  return "\n".join(lines) + f"\n\n{caption}.\n"


def _strength(rule: str, strength: float) -> str:
  return f"{'s' if rule == 'classifier' else 'w'}={strength:g}"


def _rule_label(rule: str, metadata: dict) -> str:
  params = metadata["rules"].get(rule, {})
  shown = {k: v for k, v in params.items() if not (rule == "classifier" and k == "scale")}
  return rule + (" (" + ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                                   for k, v in shown.items()) + ")"
                 if shown else "")


def plot(metadata: dict, records: list[dict], x_key: str, y_key: str) -> bytes:
  """One curve per rule through its strengths, labelled with them. Returns PNG bytes."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  labels = metadata["metric_labels"]
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  for rule in dict.fromkeys(r["rule"] for r in records):
    rows = [r for r in records if r["rule"] == rule]
    x = np.array([r[x_key] for r in rows], float)
    y = np.array([r[y_key] for r in rows], float)
    (line,) = ax.plot(x, y, "o-", label=_rule_label(rule, metadata))
    for r, xi, yi in zip(rows, x, y):
      ax.annotate(f"{r['strength']:g}", (xi, yi), textcoords="offset points",
                  xytext=(3, 3), fontsize=6, color=line.get_color())
  ax.set_xlabel(labels[x_key])
  ax.set_ylabel(labels[y_key])
  ax.set_title(f"Step {metadata['step']}: guidance rules (labels: w, or s for classifier)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return report.figure_png(fig)
