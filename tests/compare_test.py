"""--mode=compare: every guidance rule on one sweep, checked against the plain sweep and
against the rules' reductions to Eq. 6."""

import json

import numpy as np
import pytest

from cfg_guidance import api, train
from cfg_guidance.evaluation import compare, sweep
import sweep_test

RULES = ("cfg", "classifier", "apg", "autoguidance", "cfg_rescale")
STRENGTHS = (0.0, 3.0)


def compare_config():
  config = sweep_test.eval_config(precision_recall=False)
  config.compare.rules, config.compare.strengths = RULES, STRENGTHS
  # APG with η = 1, no cap and no momentum is Eq. 6 (Sadat et al.'s reduction).
  config.sample.apg_eta, config.sample.apg_momentum = 1.0, 0.0
  config.sample.cfg_rescale_phi = 0.7
  config.classifier.train.num_steps = 20  # A rough noisy classifier: only its plumbing here.
  return config


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("compare_run")
  config = compare_config()
  train.run(config, str(workdir))  # Checkpoints 10 (autoguidance's weak model) and 20.
  train.run_classifier(config, str(workdir))
  records = compare.run(config, str(workdir))
  return config, workdir, {(r["rule"], r["strength"]): r for r in records}


def test_writes_one_row_per_rule_and_strength(compared):
  config, workdir, records = compared
  assert sorted(records) == sorted((r, s) for r in RULES for s in STRENGTHS)
  out = workdir / "eval" / "compare" / "20"
  saved = json.loads((out / "results.json").read_text())
  assert [(r["rule"], r["strength"]) for r in saved["records"]] == [
      (r, s) for r in RULES for s in STRENGTHS]
  assert saved["rules"]["apg"] == {"eta": 1.0, "threshold": "inf", "momentum": 0.0}
  table = (out / "results.md").read_text()
  assert "| classifier | s = 3 |" in table and "| cfg_rescale (phi = 0.7) | w = 3 |" in table
  for name in ("fid_vs_is.png", "accuracy_vs_diversity.png"):
    assert (out / name).stat().st_size > 1000


def test_cfg_rows_equal_the_plain_sweep(compared):
  """A second code path: the evaluation's own weight_metrics with the default sampler."""
  config, workdir, records = compared
  evaluation = sweep.Evaluation(config, str(workdir))
  try:
    model = api.load(workdir)
    plain = evaluation.weight_metrics(model.eps_fn, 3.0)
  finally:
    evaluation.close()
  for key in ("fid", "is", "accuracy", "diversity"):
    np.testing.assert_allclose(records["cfg", 3.0][key], plain[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("rule,strength,same_as", [
    ("classifier", 0.0, ("cfg", 0.0)),  # s = 0 at w = 0: the conditional model.
    ("autoguidance", 0.0, ("cfg", 0.0)),  # w = 0: the good model alone.
    ("apg", 0.0, ("cfg", 0.0)),
    ("cfg_rescale", 0.0, ("cfg", 0.0)),  # At w = 0, x_cfg = x_pos: the rescale is 1.
    ("apg", 3.0, ("cfg", 3.0)),  # η = 1, r = ∞, β = 0.
])
def test_rules_reduce_to_cfg(compared, rule, strength, same_as):
  _, _, records = compared
  for key in ("fid", "is", "accuracy", "diversity"):
    np.testing.assert_allclose(records[rule, strength][key], records[same_as][key],
                               rtol=1e-3, err_msg=key)


def test_the_strong_rules_change_the_samples(compared):
  _, _, records = compared
  for rule in ("classifier", "autoguidance", "cfg_rescale"):
    assert records[rule, 3.0]["fid"] != pytest.approx(records[rule, 0.0]["fid"], rel=1e-3)
  # φ = 0.7 rescales w = 3's prediction: not CFG's samples.
  assert records["cfg_rescale", 3.0]["fid"] != pytest.approx(records["cfg", 3.0]["fid"],
                                                             rel=1e-3)


def test_bad_fields_are_named_before_any_compute(tmp_path):
  config = compare_config()
  config.compare.rules = ("cfg", "guess")
  with pytest.raises(ValueError, match="config.compare.rules"):
    compare.run(config, str(tmp_path))
  config = compare_config()
  config.compare.strengths = ()
  with pytest.raises(ValueError, match="config.compare.strengths"):
    compare.run(config, str(tmp_path))
