"""The `repq` command line: one sub-command per stage, each defined in its own module.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; the table below maps the
command name to that module and a one-line help, so `repq --help` lists everything without importing torch.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import shlex
import sys

from repq.errors import RepqError

# Each command's one-line help; its module (repq.pipeline.commands.NAME) is imported only when it runs.
_PKG = "repq.pipeline.commands"
COMMANDS: dict[str, str] = dict(line.split("  ", 1) for line in """
run  run a recipe: re-param training to INT8 engines and a report, resumable
recipe  check a recipe and print it with every default (--show)
train  train a re-param model in full precision (resumable, torchrun-ready)
substitute  RepVGG blocks -> QARepVGG blocks, then training with plain L2
ptq  post-training INT8 quantization with NVIDIA's toolkit (ModelOpt)
qat  fine-tune a quantized model with its fake quantizers (toolkit QAT)
finetune  RepQ fine-tuning through each block's merged kernel (or Merged LSQ)
export  write the QDQ ONNX file of a quantized model for one engine target
engine  build one engine of the table from an ONNX file: accuracy on it, latency, FPS
bench  latency and throughput of ONNX files on the engines of the table
eval  top-1/top-5 (or PSNR) of a checkpoint, ONNX file or engine on any folder
report  render a run folder's report.md, report.html and metrics.json again
models  list the model zoo, or check that a model fuses exactly
import  turn an official RepVGG or timm repvgg/mobileone checkpoint into a repq checkpoint (exact)
doctor  why a model loses accuracy in INT8: per-layer outliers and their branch, SQNR, engine divergence
""".strip().splitlines())

# Commands whose name is a Python keyword live in a module named otherwise.
MODULES = {"import": "import_"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repq", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = MODULES.get(name, name)
        sub.add_parser(name, help=help_text, description=help_text).set_defaults(_module=f"{_PKG}.{module}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the command name first, then let its module add its own arguments.
    first, _ = parser.parse_known_args(argv[:1])
    if first.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(first._module)
    sub = argparse.ArgumentParser(prog=f"repq {first.command}", description=COMMANDS[first.command])
    module.add_arguments(sub)
    args = sub.parse_intermixed_args(argv[1:])  # `repq run RECIPE --out DIR key=value` in any order
    try:
        return int(module.run(args) or 0)
    except RepqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept, again = _resume_hint(module, args, argv)
        print(f"interrupted: {kept}; continue with: {again}", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as err:
        full = _disk_full(err)
        if full is not None:
            kept, again = _resume_hint(module, args, argv)
            print(f"error: {_describe_full(full)}; {kept}: free space, then run {again}", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and err.errno in _USER_ERRNOS:
            where = f": {err.filename}" if err.filename else ""
            print(f"error: {err.strerror or type(err).__name__}{where}: check the path and its permissions",
                  file=sys.stderr)
            return 2
        raise


# Errors of the file system a user fixes (permissions, read-only disks, a file where a folder goes).
_USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(err: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``err`` (torch's writers wrap it in a RuntimeError), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def _describe_full(err: OSError) -> str:
    if str(err).startswith("disk full"):  # repq.reparam.io.DiskFullError: names the file and the sizes
        return str(err)
    return f"disk full while writing {err.filename or 'a file'}"


def _resume_hint(module, args: argparse.Namespace, argv: list[str]) -> tuple[str, str]:
    """(what a command that stopped kept, the command line that continues it): the command's own
    ``resume_hint(args, argv)`` when it has one, else the same command again."""
    kept, again = "finished files are kept", list(argv)
    hint = getattr(module, "resume_hint", None)
    if hint is not None:
        try:
            kept, again = hint(args, list(argv))
        except Exception:  # noqa: BLE001 -- a hint must never hide the interruption itself
            pass
    return kept, "repq " + shlex.join(again)


if __name__ == "__main__":
    sys.exit(main())
