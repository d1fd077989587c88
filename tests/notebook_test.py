"""The Colab demo notebook runs top to bottom in quick mode, with its figures and sweep.

Its install cell's choices (what to install, which JAX extra) are tested on their own,
without pip or the network.
"""

import ast
import base64
import io
import json
import pathlib
import re
import tomllib
import types

from IPython.core.inputtransformer2 import TransformerManager
import jax
import nbclient
import nbformat
import numpy as np
from PIL import Image
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "cfg_guidance_demo.ipynb"
QUICK_WEIGHTS = [0.0, 1.0, 4.0]  # The notebook's eval.guidance_weights in quick mode.


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(executed notebook, workdir): a copy run in a fresh kernel, cwd = repo root."""
  workdir = tmp_path_factory.mktemp("demo")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with pytest.MonkeyPatch.context() as env:  # The kernel inherits this environment.
    env.setenv("CFG_DEMO_QUICK", "1")
    env.setenv("CFG_DEMO_WORKDIR", str(workdir))
    env.delenv("CFG_DEMO_REPO", raising=False)  # "Run all" as it is, REPO unedited.
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(REPO)}}).execute()
  return nb, workdir


def _cell(nb, tag):
  (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  return cell


def _pngs(cell):
  return [Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"])))
          for o in cell.outputs if "image/png" in o.get("data", {})]


def _stdout(cell):
  return "".join(o["text"] for o in cell.outputs
                 if o["output_type"] == "stream" and o["name"] == "stdout")


def _results(workdir):
  (path,) = (workdir / "quick" / "digits" / "eval").glob("*/results.json")
  return json.loads(path.read_text())


def test_runs_without_pip_and_shows_every_figure(executed):
  nb, workdir = executed  # A cell that raised has already failed the fixture.
  assert "already installed" in _stdout(_cell(nb, "install"))
  # render_figure's contract: (1 + 2 eps_fns) rows x 4 weights of 3-inch panels at 80 dpi.
  (fig2,) = _pngs(_cell(nb, "fig2"))
  assert fig2.size == (4 * 3 * 80, 3 * 3 * 80)
  assert (workdir / "quick" / "fig2.png").exists()
  assert len(_pngs(_cell(nb, "grid"))) == 1
  assert len(_pngs(_cell(nb, "slider"))) == 1  # ipywidgets absent: the parameter cell path.
  # Two plots and the first and last w's sample grids.
  assert len(_pngs(_cell(nb, "sweep"))) == 4


def test_learned_toy_samples_stay_in_the_plot(executed):
  # Fig. 2's learned row against the exact-score row above it. Samples that fly off leave
  # a panel empty: a learned ε-prediction MLP's do, since x̃ = (z - σ ε̃)/α multiplies its
  # error by 1/α ≈ 2e4 at λ = -20 (measured with this quick setting: 0% of the exact
  # panels' coloured pixels at every w); the notebook's v-prediction MLP gives 96-114%.
  nb, _ = executed
  (fig2,) = _pngs(_cell(nb, "fig2"))
  rgb = np.asarray(fig2.convert("RGB")).astype(int)
  coloured = (rgb.max(-1) - rgb.min(-1)) > 60  # Scatter colours, not black text or frames.
  rows, cols = 3, 4
  h, w = coloured.shape[0] // rows, coloured.shape[1] // cols
  counts = np.array([[coloured[i * h:(i + 1) * h, j * w:(j + 1) * w].sum()
                      for j in range(cols)] for i in range(1, rows)])
  assert (counts[0] > 200).all(), counts  # The exact row is drawn at all.
  assert (counts[1] > 0.5 * counts[0]).all(), counts


def test_sweep_table_prints_the_written_results(executed):
  nb, workdir = executed
  lines = _stdout(_cell(nb, "sweep")).splitlines()
  header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["w"])
  columns = lines[header].split()
  rows = np.array([[float(v) for v in line.split()]
                   for line in lines[header + 1:header + 1 + len(QUICK_WEIGHTS)]])
  assert columns == ["w", "fid", "is", "accuracy", "diversity"]
  assert np.isfinite(rows).all()
  records = _results(workdir)["records"]
  expected = np.array([[r[c] for c in columns] for r in records])
  np.testing.assert_array_equal(rows[:, 0], QUICK_WEIGHTS)
  np.testing.assert_allclose(rows, expected, rtol=0, atol=5.1e-5)  # Printed to 4 places.


def test_guidance_makes_samples_more_classifiable(executed):
  # 150 steps learn enough of Eq. 6's conditional-minus-unconditional direction that w = 4
  # samples are recognised far more often than w = 0 ones (measured over seeds 0-3:
  # accuracy 0.24-0.32 -> 0.58-0.86, IS 2.3-2.5 -> 3.4-3.8), the paper's Fig. 4 trade-off.
  # A sign error in the guided ε, or guidance that ignores w, fails this.
  _, workdir = executed
  by_w = {r["w"]: r for r in _results(workdir)["records"]}
  assert by_w[4.0]["accuracy"] > by_w[0.0]["accuracy"] + 0.2
  assert by_w[4.0]["is"] > by_w[0.0]["is"] + 0.5


def _install_definitions():
  """The install cell's imports, constants and functions, without its install actions."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  source = TransformerManager().transform_cell(_cell(nb, "install").source)  # ! and %pip.
  keep = [node for node in ast.parse(source).body
          if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef))
          or isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)]
  namespace = {}
  exec(compile(ast.Module(keep, type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
  return types.SimpleNamespace(**namespace)


def _not_installed(name):
  del name
  return None


def _write_pyproject(folder, name):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "pyproject.toml").write_text(f'[project]\nname = "{name}"\n')


def test_saved_notebook_is_valid_and_cleared():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [(c.outputs, c.execution_count) for c in code] == [([], None)] * len(code)


def test_badge_opens_this_notebook_of_the_repo_url():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  (link,) = re.findall(r"\]\((https://colab\.research\.google\.com/github/[^)]*)\)",
                       nb.cells[0].source)
  owner, name, branch, path = re.fullmatch(
      r"https://colab\.research\.google\.com/github/([^/]+)/([^/]+)/blob/([^/]+)/(.+)",
      link).groups()
  assert path == NOTEBOOK.relative_to(REPO).as_posix()
  assert branch == "main"
  # The badge and the install cell's placeholder name the same repository.
  assert _install_definitions().REPO_URL == f"https://github.com/{owner}/{name}.git"


def test_install_nothing_when_cfg_guidance_imports(tmp_path):
  nb = _install_definitions()
  _write_pyproject(tmp_path, "cfg_guidance")
  for repo in (nb.REPO_URL, "", str(tmp_path)):
    assert nb.install_source(lambda name: object(), tmp_path, repo) is None


def test_install_the_checkout_around_the_notebook(tmp_path):
  nb = _install_definitions()
  _write_pyproject(tmp_path / "checkout", "cfg-guidance")
  _write_pyproject(tmp_path / "checkout" / "vendored", "other_project")  # Walked past.
  cwd = tmp_path / "checkout" / "vendored" / "notebooks"
  cwd.mkdir()
  assert (nb.install_source(_not_installed, cwd, nb.REPO_URL)
          == str((tmp_path / "checkout").resolve()))
  # This repository, from the notebook's own folder (where Jupyter starts its kernel).
  assert nb.find_checkout(NOTEBOOK.parent) == str(REPO)
  assert nb.find_checkout(tmp_path) is None


def test_install_outside_a_checkout_needs_an_edited_repo(tmp_path):
  nb = _install_definitions()
  _write_pyproject(tmp_path, "other_project")
  for placeholder in (nb.REPO_URL, ""):
    with pytest.raises(RuntimeError, match="REPO_URL in the install cell"):
      nb.install_source(_not_installed, tmp_path, placeholder)
  url = "https://github.com/someone/cfg_guidance.git"
  assert nb.install_source(_not_installed, tmp_path, url) == url
  archive = "/content/cfg_guidance.zip"
  assert nb.install_source(_not_installed, tmp_path, archive) == archive


def test_install_extra_matches_the_runtime_backend():
  nb = _install_definitions()
  extras = {backend: nb.jax_extra(backend) for backend in ("gpu", "tpu", "cpu", None)}
  assert extras == {"gpu": "cuda12", "tpu": "tpu", "cpu": None, None: None}
  # Each extra is the package's own, installing jax's extra of the same name.
  optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  for extra in ("cuda12", "tpu"):
    assert [d.split(">")[0] for d in optional[extra]] == [f"jax[{extra}]"]


def test_runtime_backend_is_asked_in_a_subprocess(monkeypatch):
  nb = _install_definitions()
  assert nb.runtime_jax_backend() == jax.default_backend()
  monkeypatch.setenv("JAX_PLATFORMS", "no_such_platform")  # jax imports, no backend starts.
  assert nb.runtime_jax_backend() is None
