"""The shell commands a Markdown file tells people to run, for the tests that run them."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^\s*```(\w*)\s*$")


def commands(path="README.md"):
  """Each command of the ```bash / ```sh blocks of `path` (relative to the repo root).

  Continuation lines (trailing backslash) are joined, comments and blank lines dropped;
  `a && b` stays one command, as a reader would paste it.
  """
  found, block, language = [], None, None
  for line in (ROOT / path).read_text().splitlines():
    fence = _FENCE.match(line)
    if fence and block is None:
      block, language = [], fence.group(1)
    elif fence:
      if language in ("bash", "sh", "shell"):
        found.extend(_join(block))
      block = None
    elif block is not None:
      block.append(line.strip())
  return found


def _join(lines):
  joined, current = [], ""
  for line in lines:
    if not current and (not line or line.startswith("#")):
      continue
    current += line[:-1].rstrip() + " " if line.endswith("\\") else line
    if not line.endswith("\\"):
      joined.append(_strip_comment(current).strip())
      current = ""
  return joined


def _strip_comment(command):
  """Drops a trailing `# ...` comment outside quotes."""
  quote, out = None, []
  for i, char in enumerate(command):
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char == "#" and (i == 0 or command[i - 1].isspace()):
      break
    out.append(char)
  return "".join(out)


def find(prefix, path="README.md"):
  """The one command of `path` that starts with `prefix` (an error if none or several)."""
  hits = [c for c in commands(path) if c.startswith(prefix)]
  if len(hits) != 1:
    raise LookupError(f"{path}: {len(hits)} commands start with {prefix!r}: {hits}")
  return hits[0]


if __name__ == "__main__":
  # `python tests/readme_commands.py FILE PREFIX` prints that command, for .ci/ scripts.
  import sys

  print(find(sys.argv[2], sys.argv[1]))
