"""Memory traffic of a compiled step's fusions, against the time the profile gave them.

  python -m bench.fusion_traffic HLO.txt[.gz] KERNELS.jsonl[.gz] [--variant=base]
      [--copy_gbps=3133] [--peak_tflops=989]

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

The custom calls get their own report (`library_calls`, and the CLI's second half):
the model FLOPs of each cuDNN convolution, cuBLAS matmul and cuDNN attention call,
counted from its shapes, against the time its kernels took, so the report says how
near the chip's peak the library work runs, by kind (convolution forward, input
gradient, weight gradient; matmul; attention forward and backward) and by
convolution shape. A convolution's kernels carry its HLO name; matmuls and attention
run inside command buffers, so those kernels are matched by their names and summed
by kind.
"""

import argparse
import collections
import gzip
import json
import math
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


def _instructions(hlo_text: str):
  """(name, type, opcode, operand names, line) of each instruction in an HLO text."""
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      name, hlo_type, opcode, rest = m.groups()
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      yield name, hlo_type, opcode, operands, line


def fusions(hlo_text: str) -> dict:
  """{kernel name: (bytes per launch, JAX op name, result type)} for every fusion (and
  unfused copy or transpose), under its own name and under its deduplicated_name."""
  types, found = {}, {}
  for name, hlo_type, opcode, operands, line in _instructions(hlo_text):
    types[name] = hlo_type
    if opcode not in _CHARGED:
      continue
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


# What a custom call computes, from its target; the first match wins.
_CALL_KINDS = (
    ("attention_backward", r"fmha.*Backward"),
    ("attention_forward", r"fmha"),
    ("conv_weight_grad", r"conv.*BackwardFilter"),
    ("conv_input_grad", r"conv.*BackwardInput"),
    ("conv_forward", r"conv"),
    ("matmul", r"cublas|gemm|matmul"),
)
# The same kinds for a kernel under no call's name (one in a command buffer), from the
# kernel's own name: cuDNN's flash attention says fprop or bprop (its backward's
# helpers dot_do_o and convert_dq), its convolutions fprop, dgrad or wgrad.
_KERNEL_KINDS = (
    ("attention_backward", r"sdpa.*bprop|flash.*bprop|dot_do_o|convert_dq"),
    ("attention_forward", r"sdpa|fmha|flash"),
    ("conv_weight_grad", r"wgrad"),
    ("conv_input_grad", r"dgrad"),
    ("conv_forward", r"fprop"),
    ("matmul", r"gemm|nvjet|cublas"),
)


def _shape(hlo_type: str) -> tuple[str, list[int]]:
  """The first array of an HLO type: "(bf16[2,3]{1,0}, u8[9])" -> ("bf16", [2, 3])."""
  dtype, dims = _SHAPE.search(hlo_type).groups()
  return dtype, [int(d) for d in filter(None, dims.split(","))]


def call_flops(kind: str, result: str, operands: list[str], line: str) -> tuple | None:
  """(model FLOPs, dtype, shape key) of one library call, from its HLO types; None
  where the line lacks what the count needs (dim_labels, contracting dimensions).

  A convolution does 2 FLOPs per output element and filter tap-input pair:
  2 · |y| · |w| / O, with y the forward output (a gradient's incoming gradient) and w
  the filter, [O, ...] in XLA's cuDNN calls (dim_labels o01i). A matmul does
  2 · |result| · K. Attention, q and k [B, S, N, D]: 4 · B·N·Sq·Sk·D forward, twice
  that backward (the model's FLOPs; a flash backward recomputes the logits, a third
  more).
  """
  if kind.startswith("conv"):
    filter_labels = re.search(r"dim_labels=\w+_(\w+)->", line)
    if not filter_labels or len(operands) < 2:
      return None
    y, w = {"conv_forward": (result, operands[1]),
            "conv_input_grad": (operands[0], operands[1]),
            "conv_weight_grad": (operands[1], result)}[kind]
    (dtype, y), (_, w) = _shape(y), _shape(w)
    flops = 2 * math.prod(y) * math.prod(w) // w[filter_labels.group(1).index("o")]
    spatial = "x".join(map(str, y[1:-1]))
    return flops, dtype, f"{spatial} {'x'.join(map(str, w))}"
  if kind == "matmul":
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
    if not contracting or not operands:
      return None
    _, lhs = _shape(operands[0])
    k = math.prod(lhs[int(d.strip('"'))] for d in contracting.group(1).split(",") if d)
    dtype, out = _shape(result)
    return 2 * math.prod(out) * k, dtype, ""
  # Attention: q, k as the call constrains them ([B, S, N, D]), else as given.
  constrained = re.search(r"operand_layout_constraints=\{(.*?)\}\}", line)
  types = (re.findall(r"\w+\[[0-9,]*\]", constrained.group(1)) if constrained
           else operands)
  if len(types) < 2:
    return None
  (dtype, q), (_, k) = _shape(types[0]), _shape(types[1])
  flops = 4 * math.prod(q) * k[1] * (2 if kind == "attention_backward" else 1)
  return flops, dtype, ""


def first_kind(kinds, text: str) -> str | None:
  """The first (kind, regex) pair's kind whose regex is found in text, else None."""
  return next((kind for kind, pattern in kinds if re.search(pattern, text)), None)


def library_calls(hlo_text: str, kernels, peak_tflops: float | None = None,
                  top: int = 12):
  """FLOP rates of the step's cuDNN and cuBLAS calls, by kind and by convolution shape.

  kernels: as for `traffic`. A kernel whose XLA op names a call is that call's
  (helpers included: cuDNN's padding and workspace kernels); one under another name is
  given a kind by its kernel name. Each kind's FLOPs are its calls' in the HLO, run
  once a step. Returns ms and TFLOP per step, TFLOP/s, and with peak_tflops the
  fraction of it and the ms the same FLOPs take at the peak; and how many calls had no
  FLOP count (uncounted_calls: their kernels' time is left out too).
  """
  types, calls = {}, {}
  for name, hlo_type, opcode, operands, line in _instructions(hlo_text):
    types[name] = hlo_type
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if opcode == "custom-call" and target:
      kind = first_kind(_CALL_KINDS, target.group(1))
      if kind:
        calls[name] = (kind, hlo_type, operands, line)
  counted, uncounted = {}, set()
  for name, (kind, hlo_type, operands, line) in calls.items():
    flops = call_flops(kind, hlo_type, [types[o] for o in operands], line)
    if flops is None:
      uncounted.add(name)
    else:
      counted[name] = (kind, *flops)
  by_kind = collections.defaultdict(lambda: [0, 0.0, 0.0])  # calls, FLOPs, ms
  by_shape = collections.defaultdict(lambda: [0, 0.0, 0.0])
  for kind, flops, dtype, shape in counted.values():
    by_kind[kind][0] += 1
    by_kind[kind][1] += flops
    if kind.startswith("conv"):
      by_shape[kind, dtype, shape][0] += 1
      by_shape[kind, dtype, shape][1] += flops
  for kernel, op, ms, _ in kernels:
    if op in uncounted:
      continue
    if op in counted:
      kind, _, dtype, shape = counted[op]
      by_kind[kind][2] += ms
      if kind.startswith("conv"):
        by_shape[kind, dtype, shape][2] += ms
    elif kind := first_kind(_KERNEL_KINDS, kernel.lower()):
      by_kind[kind][2] += ms
  peak = peak_tflops * 1e12 if peak_tflops else None

  def row(key, n, flops, ms):
    rate = flops / ms / 1e9 if ms else 0.0
    return [*key, n, flops / 1e12, ms, rate] + (
        [rate * 1e12 / peak, flops / peak * 1e3] if peak else [])

  kinds = [row((kind,), *v) for kind, v in by_kind.items()]
  # Slowest first: by the ms they lose against the peak where it is given.
  shapes = sorted((row(key, *v) for key, v in by_shape.items()),
                  key=lambda r: r[8] - r[5] if peak else -r[5])
  total_flops = sum(v[1] for v in by_kind.values())
  total_ms = sum(v[2] for v in by_kind.values())
  record = {"library_tflop": total_flops / 1e12, "library_ms": total_ms,
            "library_tflops_per_s": total_flops / total_ms / 1e9 if total_ms else 0.0,
            "by_kind": sorted(kinds, key=lambda r: -r[3]),
            "convs_by_shape": shapes[:top], "uncounted_calls": len(uncounted)}
  if peak:
    record["peak_tflops"] = peak_tflops
    record["library_ms_at_peak"] = total_flops / peak * 1e3
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("hlo")
  parser.add_argument("kernels")
  parser.add_argument("--variant", default="base")
  parser.add_argument("--copy_gbps", type=float, default=None,
                      help="A copy's rate on the device (bench.norm_bench measures it).")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="The chip's peak for the library calls' dtype (bf16 dense).")
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

  calls = library_calls(hlo_text, tables[args.variant], args.peak_tflops)
  at_peak = (f"; {calls['library_ms_at_peak']:.1f} ms at {args.peak_tflops:.0f}"
             if args.peak_tflops else "")
  print(f"\nlibrary calls: {calls['library_tflop']:.1f} TFLOP in "
        f"{calls['library_ms']:.1f} ms per step "
        f"({calls['library_tflops_per_s']:.0f} TFLOP/s{at_peak})"
        + (f"; calls left out (their HLO gives no FLOP count): "
           f"{calls['uncounted_calls']}" if calls["uncounted_calls"] else ""))
  peak_column = " of peak" if args.peak_tflops else ""
  for title, width in (("by_kind", 1), ("convs_by_shape", 3)):
    print(f"\n{title}: calls, TFLOP, ms, TFLOP/s{peak_column} per step")
    for row in calls[title]:
      n, tflop, ms, rate = row[width:width + 4]
      share = f" {row[width + 4]:5.1%}" if args.peak_tflops else ""
      print(f"  {n:4d} {tflop:7.2f} {ms:7.2f} {rate:6.0f}{share}  "
            f"{' '.join(row[:width])}")


if __name__ == "__main__":
  main()
