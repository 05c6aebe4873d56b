"""tbo-compile MODEL_DIR -o plan.pt [--ep N] [--dp-attention] [--mode prefill|decode]
                [--tokens N[,N...] | --decode-batch B[,B...] [--mtp K]] [--dump-dir DIR]
tbo-compile MODEL_DIR --check plan.pt     validate-only: is the plan for this model and torch, and
                                          does every schedule in it still verify against its graph

Exit status 0 with the plan written, or non-zero (2: bad arguments) with one line on stderr saying
why (and no plan file written or changed).
"""
from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import time


def _ints(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64 or 64,128, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the cause; the usage is in --help
        self.exit(2, f"{self.prog}: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tbo-compile", description="Compile an MoE model directory into a "
                                "Two-Batch-Overlap plan.")
    from importlib.metadata import PackageNotFoundError, version

    try:   # the installed distribution's version, without importing torch for --version
        __version__ = version("tbo-compiler")
    except PackageNotFoundError:
        from tbo_compiler import __version__
    from tbo_compiler.runtime.env import flag

    p.add_argument("--version", action="version", version=f"tbo-compile {__version__}")
    p.add_argument("model_dir", help="HuggingFace-style directory: config.json + *.safetensors")
    p.add_argument("-o", "--output", help="plan file to write (e.g. plan.pt)")
    p.add_argument("--check", metavar="PLAN", help="validate an existing plan instead of compiling")
    p.add_argument("--ep", type=_positive, default=1, help="expert-parallel size (ranks)")
    p.add_argument("--dp-attention", action="store_true",
                   help="DP attention: all_gather before the MoE, reduce_scatter after "
                        "(default with --ep > 1: dispatch/combine all-to-all)")
    p.add_argument("--moe-comm", choices=("a2a", "allgather", "allreduce"), default=None,
                   help="MoE communication (overrides --dp-attention)")
    p.add_argument("--mode", choices=("prefill", "decode"), default=None)
    p.add_argument("--tokens", type=_ints, help="prefill buckets: tokens per rank, e.g. 256,1024")
    p.add_argument("--decode-batch", type=_ints, help="decode buckets: requests per rank, e.g. 8,32")
    p.add_argument("--mtp", type=_positive, default=1, help="decode tokens per request (MTP), kept in one ubatch")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--block-size", type=_positive, default=16)
    p.add_argument("--max-blocks", type=_positive, default=64, help="block-table width (blocks per request)")
    p.add_argument("--profile", default="h200", help="cost-model device profile (cpu, h100, h200, h200-scaleout)")
    p.add_argument("--layers", type=_positive, default=None, help="compile only the first N layers")
    p.add_argument("--capture", choices=("make_fx", "export"), default="make_fx",
                   help="tracer: one make_fx trace (fast) or torch.export + decompositions")
    p.add_argument("--no-split", action="store_true", help="one ubatch (the no-TBO baseline)")
    p.add_argument("--dump-dir", default=flag("TBO_DUMP_DIR"),
                   help="write graph/schedule dumps here (default: $TBO_DUMP_DIR)")
    p.add_argument("--force", action="store_true", help="replace a symlink at the -o path (never a device, FIFO, "
                   "socket or directory)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def output_problem(output: str, model_dir: str, force: bool = False) -> str | None:
    """Why `-o output` must not be written, or None. The plan is written to a temporary file and
    renamed over the path: right for a plan file, destructive for anything else (as root, a
    rename over /dev/null replaces the device), so only a regular file (or nothing) is replaced."""
    out = os.path.abspath(output)
    if os.path.islink(out) and not force:
        return f"-o {output} is a symbolic link; pass --force to replace the link with the plan"
    if os.path.lexists(out):
        mode = os.stat(out).st_mode if os.path.exists(out) else os.lstat(out).st_mode
        for test, what in _KINDS:
            if test(mode) and not (force and os.path.islink(out) and what != "a directory"):
                hint = f"; give a plan file path (e.g. {output}/plan.pt)" if what == "a directory" else ""
                return f"-o {output} is {what}, not a plan file{hint}"
    if os.path.isdir(model_dir) and _inside(out, model_dir):
        return (f"-o {output} is inside the model directory {model_dir}: the plan must not replace or sit "
                "among the model's files; write it elsewhere")
    return None


def _model_args_problem(args) -> str | None:
    """--layers and --ep against the model's config, in the CLI's words (before compiling). A
    config that cannot be read is left to the compile, which names the file and field."""
    from tbo_compiler.models import read_config
    from tbo_compiler.ops.errors import TboError

    try:
        cfg = read_config(args.model_dir)
    except TboError:
        return None
    layers = getattr(cfg, "num_hidden_layers", None)
    if args.layers is not None and isinstance(layers, int) and args.layers > layers:
        return f"--layers {args.layers}: the model has {layers} layers (num_hidden_layers)"
    for field in ("n_routed_experts", "num_experts", "num_local_experts"):
        n = getattr(cfg, field, None)
        if isinstance(n, int) and n and n % args.ep:
            return f"--ep {args.ep}: the model's {n} experts ({field}) do not divide over {args.ep} ranks"
    return None


def dump_dir_problem(dump_dir: str | None) -> str | None:
    if dump_dir and os.path.lexists(dump_dir) and not os.path.isdir(dump_dir):
        return f"--dump-dir {dump_dir} exists and is not a directory"
    return None


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # bad arguments (2) or --help (0): a status, for callers of main() too
        return e.code
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import torch

    from tbo_compiler.ops.errors import one_line
    from tbo_compiler.passes.cost_model import PROFILES

    if args.check and args.output:
        print("tbo-compile: --check validates a plan and writes nothing: give -o (compile) or --check, not both",
              file=sys.stderr)
        return 2
    if args.check:
        return _check(args.check, args.model_dir)
    if not args.output:
        print("tbo-compile: give -o PLAN (compile) or --check PLAN (validate)", file=sys.stderr)
        return 1

    out = os.path.abspath(args.output)
    why = output_problem(args.output, args.model_dir, args.force) or dump_dir_problem(args.dump_dir)
    if why:
        print(f"tbo-compile: {why}", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.dirname(out)) or not os.access(os.path.dirname(out), os.W_OK):
        print(f"tbo-compile: cannot write {args.output}: {os.path.dirname(out)} is not a writable directory",
              file=sys.stderr)
        return 2
    if os.path.exists(out):  # not on stderr: a failed compile's one line is the cause, and leaves the file as it was
        logging.getLogger(__name__).info("%s exists and will be replaced when the compile succeeds", args.output)
    if args.profile not in PROFILES:
        print(f"tbo-compile: unknown --profile {args.profile!r}; have {', '.join(PROFILES)}", file=sys.stderr)
        return 1
    mode = args.mode or ("decode" if args.decode_batch else "prefill")
    if mode == "prefill" and (args.decode_batch or args.mtp > 1):
        what = "--decode-batch" if args.decode_batch else "--mtp"
        print(f"tbo-compile: {what} is a decode option; with --mode prefill give --tokens "
              "(or --mode decode)", file=sys.stderr)
        return 2
    if args.tokens and args.decode_batch:
        print("tbo-compile: give --tokens (prefill) or --decode-batch (decode), not both", file=sys.stderr)
        return 1
    if mode == "decode":
        counts = [b * args.mtp for b in (args.decode_batch or [args.tokens[0] if args.tokens else 32])]
    else:
        counts = args.tokens or [256]
    moe_comm = args.moe_comm or ("allgather" if args.dp_attention else "a2a")
    why = _model_args_problem(args)
    if why:
        print(f"tbo-compile: {why}", file=sys.stderr)
        return 2

    from rich.console import Console

    from tbo_compiler.compile import compile_model_dir
    from tbo_compiler.progress import stage_progress

    t0 = time.perf_counter()
    try:
        # a live line on a terminal, one plain line per stage on a log (tbo_compiler/progress.py)
        with stage_progress(Console(stderr=True), first="building the model (meta device)") as progress:
            plan = compile_model_dir(args.model_dir, args.output, ep=args.ep, moe_comm=moe_comm, mode=mode,
                                     token_counts=counts, tokens_per_request=args.mtp, profile=args.profile,
                                     block_size=args.block_size, max_blocks=args.max_blocks,
                                     dtype=getattr(torch, args.dtype), num_layers=args.layers,
                                     dump_dir=args.dump_dir, progress=progress, split=not args.no_split,
                                     capture=args.capture)
    except KeyboardInterrupt:
        print("tbo-compile: interrupted; no plan written", file=sys.stderr)
        return 130
    except Exception as e:  # one line, the cause; --verbose for the stack
        if args.verbose:
            raise
        print(f"tbo-compile: {one_line(e)}", file=sys.stderr)
        return 1
    for b in plan["buckets"]:
        T, progs = b["tokens"], b["programs"]
        serial = progs["serial"]["summary"]
        if "tbo" in progs:
            p, s = progs["tbo"], progs["tbo"]["summary"]
            # counted as the summary counts them: the model's comm ops, each then run once per ubatch
            print(f"T={T}: TBO cut {p['cut']}/{T - p['cut']}, {s['comm_ops'] // 2} comm ops found (each run once "
                  f"per ubatch), {s['order']} schedule, "
                  f"predicted {s['predicted_us'] / 1e3:.2f} ms vs {serial['predicted_us'] / 1e3:.2f} ms "
                  f"serial ({args.profile}; the runtime measures both and keeps the faster)")
        else:
            why = "not split (--no-split)" if args.no_split else "too few tokens to split"
            print(f"T={T}: {why}; serial program, {serial['comm_ops']} comm ops found")
    print(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s"
          + (f"; dumps in {args.dump_dir}" if args.dump_dir else ""))
    return 0


def _check(plan_path, model_dir) -> int:
    from tbo_compiler.ops.errors import TboError, one_line
    from tbo_compiler.load import programs_of
    from tbo_compiler.plan import check_plan, read_plan

    try:
        plan = read_plan(plan_path)
        check_plan(plan, plan_path, model_dir)
        n = sum(len(v) for v in programs_of(plan).values())
    except TboError as e:
        print(f"tbo-compile: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"{plan_path}: {n} programs in {len(plan['buckets'])} buckets verified against their graphs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
