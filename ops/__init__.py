"""The op vocabulary: a leaf that imports only torch.

Models, passes and runtime all import it; it imports none of them.
  errors   the one error root (TboError) and its subclasses
  kernels  compute custom ops (schemas + fakes) and the tables passes read about them
  comm     communication custom ops (start/wait halves) and their tables
  instr    the instruction IR of a schedule (Instr, stream names)
  impl     the slots the runtime fills with eager implementations
"""
from tbo_compiler.ops import comm, errors, instr, kernels  # noqa: F401  (registers the tbo ops)
