"""Memory traffic of a compiled step's fusions, against the time the profile gave them.

  python -m bench.fusion_traffic HLO.txt[.gz] KERNELS.jsonl[.gz] [--variant=base]
      [--copy_gbps=3133]

HLO is a compiled program's optimised HLO text (`Compiled.as_text()`, as bench.gpu_ab
keeps it) and KERNELS the per-kernel table of a profile of that program (bench.gpu_ab's
kernels.jsonl). Each XLA fusion is charged the bytes of its operands and results, read
and written once: the traffic it cannot avoid as fused, an upper bound where it reads an
operand only in part. Profiled kernels are matched to fusions by name (XLA names a GPU
kernel after its fusion, or after the fusion whose identical kernel it reuses: the HLO's
deduplicated_name), so the report says how fast the fused work moves its bytes and how
many bytes there are: a kernel far under the copy rate is slow at its work; bytes
near the copy rate can only fall with fewer passes over the tensors. Custom calls
(cuDNN convolutions and attention, cuBLAS) are not charged; nor is what a profile shows
under no HLO name (a host's memcpy).
"""

import argparse
import collections
import gzip
import json
import re

# Bytes per element of the HLO element types.
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
# Instructions that become kernels of their own and move data: fusions, and the copies
# and transposes XLA left unfused.
_CHARGED = ("fusion", "copy", "transpose")
# "%name = TYPE opcode(operands), attributes": TYPE may be a tuple with spaces in it.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([\w\-]+)\((.*)$")


def type_bytes(hlo_type: str) -> int:
  """Bytes of an HLO type, a tuple's summed: "(f32[2,3]{1,0}, pred[4])" -> 28."""
  total = 0
  for dtype, dims in _SHAPE.findall(hlo_type):
    count = 1
    for d in filter(None, dims.split(",")):
      count *= int(d)
    total += count * _BYTES[dtype]
  return total


def _kernel_name(name: str) -> str:
  return name.replace(".", "_").replace("-", "_")


def fusions(hlo_text: str) -> dict:
  """{kernel name: (bytes per launch, JAX op name, result type)} for every fusion (and
  unfused copy or transpose), under its own name and under its deduplicated_name."""
  types, found = {}, {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, hlo_type, opcode, rest = m.groups()
    types[name] = hlo_type
    if opcode not in _CHARGED:
      continue
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    op_name = re.search(r'op_name="([^"]*)"', line)
    shared = re.search(r'deduplicated_name="([^"]+)"', line)
    found[name] = (operands, hlo_type, op_name.group(1) if op_name else "",
                   shared.group(1) if shared else name)
  table = {}
  for name, (operands, hlo_type, op_name, shared) in found.items():
    entry = (sum(type_bytes(types.get(o, "")) for o in operands) + type_bytes(hlo_type),
             op_name, hlo_type)
    table[_kernel_name(name)] = entry
    table.setdefault(_kernel_name(shared), entry)
  return table


def _jax_op(op_name: str) -> str:
  """jit(train_step)/transpose(jvp(jit(silu)))/add_any -> transpose(jvp(silu))/add_any."""
  op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
  return re.sub(r"jit\((\w+)\)", r"\1", op_name) or "(none)"


def traffic(hlo_text: str, kernels, copy_gbps: float | None = None, top: int = 20):
  """Summary of the fused work: ms and GB per step, GB/s, by fusion kind and JAX op.

  kernels: [[kernel, XLA op, ms per step, launches per step]] (bench.gpu_ab's table).
  A kernel is matched by its own name, else by its XLA op's.
  """
  table = fusions(hlo_text)
  by_kind, by_op = (collections.defaultdict(lambda: [0.0, 0.0]) for _ in range(2))
  matched_ms = matched_bytes = unmatched_ms = 0.0
  for kernel, op, ms, launches in kernels:
    entry = table.get(_kernel_name(kernel)) or table.get(_kernel_name(op))
    if entry is None:
      unmatched_ms += ms
      continue
    nbytes = entry[0] * launches
    matched_ms += ms
    matched_bytes += nbytes
    for groups, key in ((by_kind, re.sub(r"_\d+$", "", _kernel_name(kernel))),
                        (by_op, _jax_op(entry[1]))):
      groups[key][0] += ms
      groups[key][1] += nbytes

  def rows(groups):
    ordered = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [[key, ms, nbytes / 1e9, nbytes / 1e6 / ms if ms else 0.0]
            for key, (ms, nbytes) in ordered]

  record = {"fused_ms": matched_ms, "fused_gb": matched_bytes / 1e9,
            "fused_gb_per_s": matched_bytes / 1e6 / matched_ms if matched_ms else 0.0,
            "other_ms": unmatched_ms,
            "by_kind": rows(by_kind), "by_jax_op": rows(by_op)}
  if copy_gbps:
    record["copy_gb_per_s"] = copy_gbps
    record["fused_ms_at_copy_rate"] = matched_bytes / 1e6 / copy_gbps
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("hlo")
  parser.add_argument("kernels")
  parser.add_argument("--variant", default="base")
  parser.add_argument("--copy_gbps", type=float, default=None,
                      help="A copy's rate on the device (bench.norm_bench measures it).")
  args = parser.parse_args(argv)
  with (gzip.open if args.hlo.endswith(".gz") else open)(args.hlo, "rt") as f:
    hlo_text = f.read()
  with (gzip.open if args.kernels.endswith(".gz") else open)(args.kernels, "rt") as f:
    tables = {r["variant"]: r["kernels"] for r in map(json.loads, f)}
  if args.variant not in tables:
    raise ValueError(f"--variant={args.variant!r}: {args.kernels} has {sorted(tables)}.")
  record = traffic(hlo_text, tables[args.variant], args.copy_gbps)
  print(f"fused work: {record['fused_ms']:.1f} ms, {record['fused_gb']:.1f} GB per step "
        f"({record['fused_gb_per_s']:.0f} GB/s); "
        f"other kernels {record['other_ms']:.1f} ms")
  if args.copy_gbps:
    print(f"the same bytes at the copy rate ({args.copy_gbps:.0f} GB/s): "
          f"{record['fused_ms_at_copy_rate']:.1f} ms")
  for title in ("by_kind", "by_jax_op"):
    print(f"\n{title}: ms, GB, GB/s per step")
    for key, ms, gb, gbps in record[title]:
      print(f"  {ms:7.2f} {gb:7.2f} {gbps:6.0f}  {key}")


if __name__ == "__main__":
  main()
