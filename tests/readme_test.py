"""Every command README.md tells people to run is run somewhere: a test or CI.

The table below names, for each command, the file that runs it; the test fails when the
README gains a command nobody runs, or when a runner no longer takes it from the README.
"""

import pathlib

import readme_commands

ROOT = readme_commands.ROOT

# Command prefix -> the file that runs that README command (taking it from the README).
RUNNERS = {
    # The Quickstart, verbatim but for the workdir, then its outputs are checked.
    "pip install -e . && python -m cfg_guidance.main --config=configs/digits.py":
        ".ci/readme_commands",
    'pip install -e ".[test]" && python -m pytest': ".ci/run",
    # An accelerator's extra: the same install as CI's (constraints) with JAX's CUDA wheels;
    # the core set's resolution for other platforms is .ci/check_platforms.
    'pip install -e ".[cuda12,tf]" -c constraints.txt': ".ci/check_platforms",
    "python -m cfg_guidance.toy --out=": ".ci/readme_commands",
    # The noisy classifier and the guidance comparison on the Quickstart's run, quick.
    "python -m cfg_guidance.main --config=configs/digits.py --workdir=/tmp/cfg_digits "
    "--mode=train_classifier": ".ci/readme_commands",
    "python -m cfg_guidance.main --config=configs/digits.py --workdir=/tmp/cfg_digits "
    "--mode=compare": ".ci/readme_commands",
    "python -m cfg_guidance.main --config=configs/toy2d.py": ".ci/readme_commands",
    # On a fake ILSVRC2012 in the real layout, a tiny model, a stand-in Inception graph.
    'python -c "import tensorflow_datasets as tfds; tfds.builder(\'imagenet2012\'':
        "tests/readme_imagenet_test.py",
    "python -m cfg_guidance.main --config=configs/imagenet64.py --workdir=gs://BUCKET/in64 "
    "--config.data.data_dir=": "tests/readme_imagenet_test.py",
    "python -m cfg_guidance.main --config=configs/imagenet64.py --workdir=gs://BUCKET/in64 "
    "--mode=evaluate": "tests/readme_imagenet_test.py",
}


def _runner(command):
  hits = [prefix for prefix in RUNNERS if command.startswith(prefix)]
  assert len(hits) == 1, f"README command run by {len(hits)} entries of RUNNERS: {command}"
  return RUNNERS[hits[0]]


def test_every_readme_command_has_a_runner():
  commands = readme_commands.commands("README.md")
  assert len(commands) >= len(RUNNERS)
  for command in commands:
    assert (ROOT / _runner(command)).is_file(), command
  unused = [p for p in RUNNERS if not any(c.startswith(p) for c in commands)]
  assert not unused, f"RUNNERS entries with no README command: {unused}"


def test_ci_runs_the_readme_test_command_and_the_readme_script():
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  test_command = readme_commands.find('pip install -e ".[test]"').split(" && ")[1]
  assert test_command in ci
  assert "bash .ci/readme_commands" in ci


def test_the_ci_script_takes_its_commands_from_the_readme():
  script = (ROOT / ".ci" / "readme_commands").read_text().splitlines()
  # The script looks each one up with `readme "PREFIX"`; those lookups must still work.
  taken = [readme_commands.find(_quoted(line)) for line in script if "$(readme " in line]
  for prefix, runner in RUNNERS.items():
    if runner == ".ci/readme_commands":
      assert any(command.startswith(prefix) for command in taken), prefix


def _quoted(line):
  return line.split('$(readme "', 1)[1].split('")', 1)[0]


def test_commands_join_continuations_and_drop_comments(tmp_path):
  (tmp_path / "x.md").write_text(
      "text\n```bash\n# setup\nrun a \\\n   --flag=1  # why\n\nrun 'b # not a comment'\n"
      "```\n```python\nprint(1)\n```\n")
  got = readme_commands.commands(pathlib.Path(tmp_path / "x.md"))
  assert got == ["run a --flag=1", "run 'b # not a comment'"]
