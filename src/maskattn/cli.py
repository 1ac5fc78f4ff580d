"""The ``maskattn`` command line: the demo, training, prediction, evaluation and mask pictures."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from maskattn.distributed import environment_int
from maskattn.errors import TrainingError, UsageError
from maskattn.io import check_output_file
from maskattn.masks import expr
from maskattn.tasks.base import Option, Task, fraction, positive_int, seed_int, tasks


def shortcuts() -> tuple[str, ...]:
    """The data settings ``maskattn train`` takes as ``--NAME PATH``: every task's paths, each once, in order."""
    return tuple(dict.fromkeys(path for task in tasks().values() for path in task.paths))


def __getattr__(name: str):  # SHORTCUTS: the constant this module had before tasks were registered
    if name == "SHORTCUTS":
        return shortcuts()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nonempty_path(text: str) -> str:
    """An argparse type: a path that is not empty (``Path("")`` is the working directory, which would be used)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"an empty path ({text!r}); name the file or directory")
    return text


class _Once(argparse.Action):
    """An option given at most once: argparse keeps the last of two, and a second ``--config`` would drop every
    setting of the first file without a word."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, f"given twice ({getattr(namespace, self.dest)}, {values}): only one "
                                         "is read; put the settings in one file, or change them with --set")
        setattr(namespace, self.dest, values)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_task_commands(sub, registered: dict[str, Task]) -> None:
    """One prediction subcommand per task (``maskattn translate`` ...), as the task defines it."""
    for task in registered.values():
        command = sub.add_parser(task.predict.name, help=task.predict.help)
        command.add_argument("model", help=f"a model directory written by `maskattn train {task.name}`")
        task.predict.arguments(command)
        command.set_defaults(handler=task.predict.run)


def _add_evaluate_options(evaluate: argparse.ArgumentParser, registered: dict[str, Task]) -> None:
    """Every task's own ``maskattn evaluate`` flags, each flag once, its help prefixed by the tasks that read it."""
    helps: dict[str, list[str]] = {}
    kinds: dict[str, Option] = {}
    for task in registered.values():
        for option in task.evaluate_options:
            helps.setdefault(option.flag, []).append(f"{task.name}: {option.help}")
            first = kinds.setdefault(option.flag, option)
            if (first.type, first.repeat) != (option.type, option.repeat):  # one parser argument serves both
                raise ValueError(f"evaluate flag {option.flag}: task {task.name!r} reads it as "
                                 f"{option.type.__name__}{' (repeated)' * option.repeat}, another task as "
                                 f"{first.type.__name__}{' (repeated)' * first.repeat}; a shared flag needs one kind")
    for flag, texts in helps.items():
        extra = {"action": "append"} if kinds[flag].repeat else {}
        evaluate.add_argument(flag, type=kinds[flag].type, help="; ".join(texts), **extra)


class _Parser(argparse.ArgumentParser):
    """A parser that takes flags only as written in full: argparse would read any unambiguous prefix as the
    flag it begins (`train --res` as --resume, `--over` as --overwrite), and a flag added later that shares
    the prefix would change what an old command means. Subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    registered = tasks()
    parser = _Parser(prog="maskattn", description=__doc__,
                                     epilog="Exit status: 0 success, 1 a failed check or run (see each command), "
                                     "2 bad input (one line on stderr; -v shows its traceback).")
    parser.add_argument("--version", action="version", version=f"maskattn {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more messages (debug), and the traceback of an error")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small Transformer to translate written dates to ISO dates",
                          description="The embedded default task, generated by maskattn: trains on 2 CPU "
                          "cores in a few minutes, prints the held-out exact match and writes a cross-attention PNG. "
                          "Exit status 0 when the exact match on the held-out dates is >= 99%, else 1.")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--steps", type=positive_int, default=2000, help="training steps (default: 2000)")
    demo.add_argument("--seed", type=seed_int, default=0, help="seed of the data and the training (default: 0)")
    demo.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    demo.add_argument("--overwrite", action="store_true", help="delete the run in --out first")

    train = sub.add_parser("train", help="train a task model", formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train TASK. Settings come from the task's defaults, then --config, then "
                           "--set; `maskattn train TASK --show-config` lists every setting and its default.")
    train.add_argument("task", choices=list(registered), help="the task to train")
    train.add_argument("--config", action=_Once, type=nonempty_path,
                       help="a TOML file of settings, sections as in --show-config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set train.lr=3e-4 --set model.d_model=256 (repeatable)")
    train.add_argument("--out", help="run directory (same as --set out=...)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run directory")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run in the run directory: it is set aside, deleted at the new run's first "
                       "checkpoint and put back if the new run fails before it (a directory holding anything a run "
                       "does not write is refused); without --resume or --overwrite the run directory must be empty")
    train.add_argument("--show-config", action="store_true", help="print the resolved settings and exit")
    for name in shortcuts():
        readers = ", ".join(task.name for task in registered.values() if name in task.paths)
        train.add_argument(f"--{name.replace('_', '-')}", dest=name,
                           help=f"shortcut for --set data.{name}=PATH ({readers})")
    _add_task_commands(sub, registered)

    evaluate = sub.add_parser("evaluate", help="score a trained model on any data file")
    evaluate.add_argument("model", help="a trained model directory, or a Hugging Face causal LM directory")
    evaluate.add_argument("--data", required=True, type=nonempty_path, help="; ".join(f"{t.name}: {t.data_help}"
                                                                 for t in registered.values()))
    _add_evaluate_options(evaluate, registered)

    average = sub.add_parser("average", help="average the weights of a run's last N checkpoints, or of models",
                             description="Writes a model directory like RUN/model (same config, tokenizer and "
                             "task) whose weights are the mean of the last N step checkpoints of RUN; with "
                             "--models, the mean of finished models of one architecture (a model soup).")
    average.add_argument("run", nargs="?", help="a run directory of `maskattn train` (with model/ and step-* "
                         "checkpoints)")
    average.add_argument("--last", type=positive_int, help="how many of the run's newest checkpoints to average")
    average.add_argument("--models", nargs="+", metavar="MODEL", help="model directories to average instead of a run")
    average.add_argument("--out", required=True, type=nonempty_path, help="the new model directory")
    average.add_argument("--overwrite", action="store_true", help="replace the model directory --out already holds")

    _add_compress(sub)

    viz = sub.add_parser("viz", help="attention heatmaps and the explorer page for one input",
                         description="Writes a PNG per layer and head, a grid per layer, and explorer.html "
                         "(self-contained: pick layer, head and attention kind, hover a token).")
    viz.add_argument("model", help="a trained model directory, or a Hugging Face directory")
    viz.add_argument("--input", required=True, help="the input text (caption models: a PNG image)")
    viz.add_argument("--target", help="decoder input for encoder-decoder models (default: the model's output)")
    viz.add_argument("--out", default="viz", type=nonempty_path, help="output directory (default: viz)")

    audit = sub.add_parser("audit", help="prove that no output depends on what the mask hides",
                           description="Audits a saved model (every attention call: perturbation and exact-zero "
                           "Jacobian; decoders: logits at t vs later tokens), or, without MODEL, every model class "
                           "of maskattn.models with its standard masks. Exits 1 on a leak.")
    audit.add_argument("model", nargs="?", help="a maskattn or Hugging Face model directory (default: built-ins)")
    audit.add_argument("--length", type=positive_int, default=10,
                       help="sequence length of the probe inputs (default: 10)")

    showcase = sub.add_parser("showcase", help="draw every kind of mask and check attention against PyTorch")
    showcase.add_argument("--length", type=positive_int, default=8, help="sequence length of the pictures (default: 8)")

    masks_cmd = sub.add_parser("masks", help="draw masks written as expressions").add_subparsers(
        dest="masks_command", required=True)
    show = masks_cmd.add_parser("show", help="render a mask expression as text (and optionally PNG)",
                                description=f"Expression: names {expr.names()}, combined with &, |, ~ and "
                                "parentheses (padding: valid key lengths per batch item; document: lengths of "
                                "packed documents).")
    show.add_argument("expression", help='e.g. "causal & window(4)"')
    show.add_argument("--length", type=positive_int, default=16, help="query and key length (default: 16)")
    show.add_argument("--keys", type=positive_int, default=None, help="key length (default: --q-offset + --length)")
    show.add_argument("--q-offset", type=int, default=0, help="absolute position of the first query (default: 0)")
    show.add_argument("--png", default=None, help="also write a PNG picture here")
    stats = masks_cmd.add_parser("stats", help="what a mask costs: density, empty rows, tiles, skipped FLOPs")
    stats.add_argument("expression", help='e.g. "causal & window(256)"')
    stats.add_argument("--length", type=positive_int, default=4096, help="query and key length (default: 4096)")
    stats.add_argument("--block", type=positive_int, default=128, help="tile size of the block map (default: 128)")
    stats.add_argument("--head-dim", type=positive_int, default=64, help="head dim D for the FLOP count (default: 64)")
    masks_cmd.metavar = "{" + ",".join(masks_cmd.choices) + "}"  # "required: {show,stats}", not its dest's name
    _add_export_command(sub)
    _verbosity_everywhere(sub)
    _describe_commands(sub)
    return parser


def _describe_commands(sub: argparse._SubParsersAction) -> None:
    """A command's ``--help`` begins with what it does: its one line in the list of commands, where it has no
    longer description of its own (argparse shows that line in the list only)."""
    for listed in sub._choices_actions:
        parser = sub.choices[listed.dest]
        parser.description = parser.description or listed.help
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _describe_commands(action)


def _verbosity_everywhere(sub: argparse._SubParsersAction) -> None:
    """Accept -v / -q after a command too (``maskattn translate MODEL -v ...``), not only before it; absent
    there, the value given before the command (or its default) stands."""
    for parser in sub.choices.values():
        parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbosity_everywhere(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("maskattn")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _launched_rank(parser: argparse.ArgumentParser) -> int:
    """RANK as set by ``torchrun`` (0 when not launched by it); a usage error naming it when it is not an int >= 0."""
    try:
        return environment_int("RANK", 0, 0)
    except ValueError as e:
        parser.error(str(e))


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; inputs given after an option (``translate MODEL --beam 1 "Ein Mann."``,
    ``caption MODEL --example a.png b.png``) join the command's list of texts or images, which argparse
    alone would refuse."""
    args, extra = parser.parse_known_args(argv)
    inputs = next((name for name in ("text", "images") if isinstance(getattr(args, name, None), list)), None)
    if extra and inputs and not any(e.startswith("-") for e in extra):
        getattr(args, inputs).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class _Stderr(logging.StreamHandler):
    """A handler writing to the current ``sys.stderr`` (which tests capture and replace)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: int = 0, quiet: bool = False, *, rank: int = 0) -> None:
    """Messages and progress of the ``maskattn`` logger on stderr: INFO by default, DEBUG with -v,
    WARNING with -q or on ranks other than 0 (under torchrun only rank 0 reports)."""
    logger = logging.getLogger("maskattn")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):  # one handler however often main() runs
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)  # propagation stays on: a program's or pytest's own handlers still see records
    quiet = quiet or rank != 0
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _add_export_command(sub) -> None:
    export = sub.add_parser("export", help="write a saved model as ONNX or a torch.export program (.pt2)",
                            description="Dynamic batch and lengths. A Transformer writes two graphs beside OUT: "
                            "<stem>.encoder<ext> and <stem>.decoder_step<ext> (signatures: maskattn.export). "
                            "ONNX needs `pip install maskattn[onnx]`.")
    export.add_argument("model", help="a model directory (a trained task model or models.save)")
    export.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="file format (default: onnx)")
    export.add_argument("--out", required=True, help="the file to write (.onnx or .pt2, as --format)")
    export.add_argument("--overwrite", action="store_true", help="replace the files --out names if they exist")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from maskattn.export import export
    from maskattn.models import load

    for path in export(load(args.model), args.out, format=args.format, overwrite=args.overwrite,
                       inputs=[args.model]):
        print(f"wrote {path}")
    return 0


def run() -> int:
    """The ``maskattn`` program: :func:`main` in a process that keeps its freed memory and a small kernel cache
    (see ``allocator``)."""
    from maskattn.allocator import keep_freed_memory, limit_kernel_cache

    keep_freed_memory()  # only here, not in main(): a program calling main() keeps its own allocator settings
    limit_kernel_cache()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    _expand_home(args)
    configure_logging(args.verbose, args.quiet, rank=_launched_rank(parser))
    handler = getattr(args, "handler", None) or {  # a task's prediction command sets its own handler
        "demo": _demo, "train": _train, "evaluate": _evaluate, "viz": _viz, "audit": _audit, "showcase": _showcase,
        "masks": _masks_show, "average": _average, "compress": _compress}[args.command]
    if getattr(args, "model", None):  # a Hugging Face directory: viz / audit / evaluate / generate run it
        from maskattn import hf_inspect

        if hf_inspect.is_hf_directory(args.model):
            handler = hf_inspect.COMMANDS.get(args.command, handler)
            if args.command == "evaluate":  # scored as a causal LM, which reads none of the tasks' flags
                handler = functools.partial(_refusing_task_flags, handler, set(), "a Hugging Face model")
    try:
        _check_text_arguments(args)
        return handler(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        again = " (maskattn train ... --resume continues from the last checkpoint)" if args.command == "train" else ""
        print(f"maskattn {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `maskattn masks show ... | head`: the reader left; stop quietly, as `yes | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, the status of a shell tool stopped by a closed pipe
    except TrainingError as e:  # training could not go on: not a usage error, but no traceback either
        return _failed(args, str(e), 1)
    except ImportError as e:  # an optional package a command needs: one line naming the extra that installs it
        extra = _EXTRAS.get((e.name or "").split(".")[0]) if isinstance(e, ModuleNotFoundError) else None
        if extra is None and "pip install" not in str(e):
            raise
        hint = f"; pip install 'maskattn[{extra}]'" if extra else ""
        return _failed(args, f"{e}{hint}", 2)
    except USER_ERRORS as e:  # bad input, named in the message; anything else is a bug and shows its traceback
        return _failed(args, str(e), 2)
    except OSError as e:  # the output's disk is full or read-only: not a bug (a read-only place is bad input)
        if e.errno not in WRITE_ERRORS:
            raise
        where = e.filename or getattr(args, "out", None) or "the output"
        return _failed(args, f"could not write {where}: {e.strerror}", 2 if e.errno == errno.EROFS else 1)
    except RuntimeError as e:  # out of memory (torch.OutOfMemoryError, or the CPU allocator's RuntimeError)
        if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in str(e):
            raise
        return _failed(args, _out_of_memory(args, str(e)), 1)


# The arguments that name files or directories, by their dest (and the train path flags, shortcuts()).
PATH_ARGUMENTS = ("model", "run", "models", "images", "out", "config", "data", "png", "ref", "hypotheses",
                  "predictions", "ensemble", "keep_heads", "example")


def _expand_home(args: argparse.Namespace) -> None:
    """A ``~`` that begins a path argument is the home directory: a shell expands it only at the start of a word,
    so ``--out=~/runs/x`` arrives as typed, and a directory named ``~`` would be made in the working directory."""
    for name in (*PATH_ARGUMENTS, *shortcuts()):
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])


def _out_of_memory(args: argparse.Namespace, error: str) -> str:
    """One line for an allocation that failed: its size, and the settings this command was given (a size set
    far too large, ``--set model.d_model=1000000000``, fails so while the model is built)."""
    import re

    asked = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGTP]?iB)", error)
    size = "" if asked is None else (f" ({int(asked[1]) / 2**30:,.1f} GiB asked for)" if asked[1] else
                                     f" ({asked[2]} asked for)")
    given = [*(f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "verbose"),
             *(f"--set {assignment}" for assignment in getattr(args, "set", None) or [])]
    return f"out of memory{size}; lower the sizes given ({', '.join(given) or 'none on the command line'})"


def _failed(args: argparse.Namespace, message: str, status: int) -> int:
    """Say why the command failed in one line (after the traceback with -v) and return its exit status: -v adds
    the traceback, it never changes the status a script reads (2 bad input, 1 a failed run or check)."""
    if args.verbose:
        traceback.print_exc()
    message = message.removeprefix(f"{args.command}: ")  # a library check that names its command already
    print(f"maskattn {args.command}: {message}", file=sys.stderr)
    return status


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse arguments that are not UTF-8 text (bytes the shell passed through as lone surrogates)."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise UsageError(f"argument {name}: not UTF-8 text (byte "
                                     f"{item[e.start].encode('utf-8', 'surrogateescape')!r} at character {e.start}); "
                                     "give text in UTF-8") from None


@contextlib.contextmanager
def _new_model_directory(out: str, overwrite: bool, inputs: list[str]) -> Iterator[None]:
    """``--out`` of a command that writes a model: new or empty, or with ``--overwrite`` a model directory,
    set aside while the command runs (deleted when it succeeds, put back when it fails); never one of the
    command's ``inputs`` or a directory holding them, nor a directory holding other files."""
    from maskattn.io import MANIFEST, set_aside
    from maskattn.models.persistence import CONFIG, TOKENIZER, WEIGHTS
    from maskattn.tasks.common import TASK_FILE

    path = Path(out)
    for given in inputs:
        if path.resolve() == Path(given).resolve() or path.resolve() in Path(given).resolve().parents:
            raise UsageError(f"--out {out}: it holds the input {given}; write the new model somewhere else")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: a file, expected a directory to write the model to")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not held:
        yield
        return
    if not overwrite:
        raise UsageError(f"--out {out} is not empty (it holds {', '.join(held[:6])}): choose a new directory, or "
                         "replace the model in it with --overwrite")
    foreign = [name for name in held if name not in {CONFIG, WEIGHTS, TOKENIZER, MANIFEST, TASK_FILE}]
    if foreign:
        raise UsageError(f"--out {out}: will not replace it, it holds {', '.join(foreign[:6])}, which is not part of "
                         "a model directory")
    with set_aside(path):
        yield


def _average(args: argparse.Namespace) -> int:
    from maskattn.averaging import average_models, average_run

    if args.models and (args.run or args.last is not None):
        raise UsageError("give either RUN --last N or --models MODEL ..., not both")
    if not args.models and (not args.run or args.last is None):
        raise UsageError("give RUN --last N (a run's checkpoints) or --models MODEL ... (finished models)")
    if args.models is not None and len(args.models) < 2:  # (average_models says "models: ...", its parameter)
        raise UsageError(f"--models: give at least two model directories to average, got {len(args.models)}")
    runs = [args.run, str(Path(args.run) / "model")] if args.run else []  # the run's model is read: never --out
    with _new_model_directory(args.out, args.overwrite, [*(args.models or []), *runs]):
        print(average_models(args.models, args.out) if args.models else average_run(args.run, args.last, args.out))
    return 0


# --- maskattn compress ------------------------------------------------------------------------------
def _add_compress(sub) -> None:
    compress = sub.add_parser(
        "compress", help="int8 linear layers and/or pruned attention heads: a smaller model directory",
        description="Writes a model directory like MODEL (same task and tokenizer) that loads with maskattn.load "
        "and runs with every prediction command. --prune-heads removes the heads whose masking changes the "
        "loss on --data least, then fine-tunes on --data; --int8 then quantises the linear layers.")
    compress.add_argument("model", help="a model directory written by `maskattn train`")
    compress.add_argument("--out", required=True, type=nonempty_path, help="the new model directory")
    compress.add_argument("--overwrite", action="store_true", help="replace the model directory --out already holds")
    compress.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the linear layers")
    compress.add_argument("--prune-heads", type=fraction, default=0.0, metavar="FRACTION",
                          help="remove this fraction of all attention heads, least important first (default 0)")
    compress.add_argument("--per-module", action="store_true",
                          help="remove FRACTION of each attention module's heads (default: of all heads, so that "
                          "some modules lose more than others)")
    compress.add_argument("--greedy", type=int, default=0, metavar="N",
                          help="choose the heads in rounds of N units (heads, or key/value groups under grouped-query "
                          "attention), measuring the importance again after each round with the units already "
                          "chosen masked out (default 0: one ranking)")
    compress.add_argument("--fade-steps", type=int, default=0, metavar="N",
                          help="fade the chosen heads out over the first N fine-tuning steps, then remove them "
                          "(default 0: removed before the fine-tune)")
    compress.add_argument("--keep-heads", metavar="FILE",
                          help="prune to exactly these heads instead of choosing them: a JSON file, either "
                          "{attention module: [heads to keep]} or an earlier `maskattn compress` output (its "
                          "kept_heads); modules not named keep all their heads")
    compress.add_argument("--seed", type=seed_int, default=None,
                          help="seed of the fine-tune's dropout and batch order (default: the data's own order), "
                          "for several fine-tunes of one choice of heads to average with `maskattn average --models`")
    compress.add_argument("--average-last", type=int, default=1, metavar="N",
                          help="keep the mean of the fine-tune's weights after its last N steps --average-every "
                          "apart (stochastic weight averaging; default 1: its last weights)")
    compress.add_argument("--average-every", type=int, default=1, metavar="K",
                          help="steps between the weights --average-last averages (default 1)")
    compress.add_argument("--data", nargs="+", default=[], metavar="FILE",
                          help="the task's training data, for --prune-heads (translation: a TSV, or source and "
                          "target files; classification: a labelled file)")
    compress.add_argument("--finetune-steps", type=int, default=100,
                          help="fine-tuning steps after pruning (default 100)")
    compress.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    compress.add_argument("--importance-batches", type=int, default=8,
                          help="batches of --data the head importance is measured on (default 8)")
    compress.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per batch (default 2048)")
    compress.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="constant",
                          help="fine-tuning learning-rate schedule (default constant; cosine and linear decay to zero)")
    compress.add_argument("--warmup", type=int, default=0, help="fine-tuning warm-up steps (default 0)")
    compress.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                          help="weight of distillation from the unpruned model in the fine-tune loss (default 0)")
    compress.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    compress.add_argument("--bf16", action="store_true", help="fine-tune under bfloat16 autocast")
    compress.add_argument("--float-embeddings", action="store_true",
                          help="with --int8: keep token tables and the output projections tied to them float")


def _compress(args: argparse.Namespace) -> int:
    from maskattn.compression import compress
    from maskattn.io import read_json_object

    keep_heads = None
    if args.keep_heads:
        given = Path(args.keep_heads)
        keep_heads = {} if given.is_dir() else read_json_object(given)
        if given.is_dir() or {"format", "config"} <= set(keep_heads):  # e.g. the pruned model, or its config.json
            raise UsageError(f"--keep-heads {given} is a {'directory' if given.is_dir() else 'model config'}; give "
                             "the JSON that `maskattn compress` printed when it pruned (its kept_heads), or "
                             "{attention module: [heads to keep]}")
        if "heads_before" in keep_heads and "kept_heads" not in keep_heads:
            raise UsageError(f"--keep-heads {args.keep_heads}: this `maskattn compress` output has no kept_heads "
                             "(that run pruned no heads)")
        keep_heads = keep_heads.get("kept_heads", keep_heads)
    with _new_model_directory(args.out, args.overwrite, [args.model]):
        result = compress(args.model, args.out, int8=args.int8, prune_heads=args.prune_heads, data=args.data,
                          finetune_steps=args.finetune_steps, lr=args.lr, importance_batches=args.importance_batches,
                          max_tokens=args.max_tokens, schedule=args.schedule, warmup=args.warmup,
                          distill=args.distill, temperature=args.temperature, bf16=args.bf16,
                          int8_embeddings=not args.float_embeddings, per_module=args.per_module, greedy=args.greedy,
                          fade_steps=args.fade_steps, keep_heads=keep_heads, seed=args.seed,
                          average_last=args.average_last, average_every=args.average_every)
    print(json.dumps(result, indent=2))
    return 0


# Optional packages (pyproject.toml's extras) -> the extra that installs each.
_EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "transformers": "hf", "sklearn": "caption",
           "tensorboard": "tensorboard"}
# What the command line reports as a usage error (one line, exit 2): the library's typed user errors
# (maskattn.errors.UsageError, io.FormatError, data.DataError, masks' and configs' ValueErrors: every check
# of an argument raises a ValueError naming it) and files that cannot be used as given. KeyError and
# TypeError are not among them: the few that are user errors are typed (UnknownSettingError, ...).
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
               FileExistsError)
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # a write the file system refused


def _demo(args: argparse.Namespace) -> int:
    from maskattn.demo import run

    result = run(out=args.out, steps=args.steps, seed=args.seed, resume=args.resume, overwrite=args.overwrite)
    return 0 if result["exact_match"] >= 99.0 else 1


def _train(args: argparse.Namespace) -> int:
    from maskattn import config, distributed
    from maskattn.checkpoint import CheckpointError
    from maskattn.errors import RunDirectoryError
    from maskattn.plotting import plot_curves
    from maskattn.run_directory import check_run_directory, replacing_run, run_lock
    from maskattn.tasks.common import refuse_derived

    task = tasks()[args.task]
    assignments = list(args.set)
    set_keys = {item.split("=", 1)[0].strip() for item in args.set}

    def flag_setting(flag: str, key: str, value: str) -> None:
        """``--out DIR`` as ``--set out=DIR``; beside a --set of the same setting, which of the two wins would
        not follow the order they were written in: refused."""
        if key in set_keys:
            raise UsageError(f"{flag} {value} and --set {key}=... both set {key}; give one of them")
        assignments.append(f"{key}={json.dumps(value, ensure_ascii=False)}")

    for name in shortcuts():
        if getattr(args, name) is None:  # given, even empty, it is passed on (the task names an empty path)
            continue
        if name not in task.paths:  # else "unknown setting 'data.NAME'", which no flag names
            flags = (", ".join(f"--{path.replace('_', '-')}" for path in task.paths)
                     or "no path flags (--show-config lists its settings)")
            raise UsageError(f"--{name.replace('_', '-')} is not read by the {task.name} task; it reads {flags}")
        flag_setting(f"--{name.replace('_', '-')}", f"data.{name}", getattr(args, name))
    if args.out is not None:  # `--out ""` is refused by the config, not replaced by the default run directory
        flag_setting("--out", "out", args.out)
    cfg = config.load(task.config(), args.config, assignments)
    # `--set out=~/x` and a TOML `out = "~/x"` reach no shell: their `~` is the home directory, as on the command line
    data = {name: os.path.expanduser(value) for name in task.paths  # (a path the data settings lack: not a path)
            if isinstance(value := getattr(cfg.data, name, None), str)}
    cfg = config.update(cfg, {"out": os.path.expanduser(cfg.out), "data": data})
    if task.derived is not None:  # a setting the task sets itself, changed from its default, would be ignored
        derived, default = task.derived(cfg), task.config()
        refuse_derived(derived, [key for key in derived if config.get(cfg, key) != config.get(default, key)])
    if task.metrics and cfg.train.metric not in task.metrics:  # else found only at the first evaluation
        raise UsageError(f"train.metric={cfg.train.metric!r} is not one of the {task.name} task's validation "
                         f"metrics: {', '.join(task.metrics)}")
    if args.show_config:
        print("\n".join(config.describe(cfg)))
        return 0
    context = distributed.init()  # the one place a run joins torchrun's process group; the tasks read it from there
    if not context.is_main:
        configure_logging(quiet=True, rank=context.rank)
    try:
        with contextlib.ExitStack() as held:
            # Rank 0 checks the directory (at once, before any data is read) and holds it: one run trains in it at a
            # time (replacing_run locks the new directory it makes under --overwrite); every rank hears a refusal,
            # so that the others stop with it instead of crashing in their next collective call.
            refused: Exception | None = None
            if context.is_main:
                try:
                    check_run_directory(cfg.out, resume=args.resume, overwrite=args.overwrite)
                    held.enter_context(run_lock(cfg.out))
                    if args.overwrite:  # the old run is set aside, and put back if the new one fails before its
                        held.enter_context(replacing_run(cfg.out))  # first checkpoint
                except RunDirectoryError as e:
                    refused = e
            if distributed.all_sum(float(refused is not None)) > 0:
                raise refused or RunDirectoryError(f"run directory {cfg.out}: refused by rank 0 (its message says why)")
            distributed.barrier()  # no rank starts before rank 0 has set the old run aside
            result = task.train(cfg, resume=args.resume)
    except CheckpointError as e:
        print(f"maskattn train: {e}", file=sys.stderr)
        return 2
    if context.is_main:  # under torchrun only rank 0 writes and prints
        plot_curves(Path(cfg.out) / "metrics.jsonl")  # curves.png beside it
        print(json.dumps(result, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from maskattn.tasks.common import read_task

    name = read_task(args.model).get("task")
    task = tasks().get(name)
    if task is None:
        raise ValueError(f"{args.model}: no evaluation for task {name!r}")
    own = {o.flag for o in task.evaluate_options}
    _refuse_task_flags(args, own, f"a {name} model")
    options = {o.keyword: getattr(args, _dest(o.flag)) for o in task.evaluate_options
               if getattr(args, _dest(o.flag)) is not None}
    print(json.dumps(task.evaluate_file(args.model, args.data, **options), indent=2))
    return 0


def _refuse_task_flags(args: argparse.Namespace, own: set[str], what: str) -> None:
    """UsageError naming the evaluate flags given that ``what`` does not read (they would be ignored)."""
    foreign = sorted({o.flag for t in tasks().values() for o in t.evaluate_options
                      if o.flag not in own and getattr(args, _dest(o.flag), None) is not None})
    if foreign:
        raise UsageError(f"{', '.join(foreign)}: not read when evaluating {what} (its flags: "
                         f"{', '.join(sorted(own)) or 'none'})")


def _refusing_task_flags(handler: Callable[[argparse.Namespace], int], own: set[str], what: str,
                         args: argparse.Namespace) -> int:
    _refuse_task_flags(args, own, what)
    return handler(args)


def _viz(args: argparse.Namespace) -> int:
    from maskattn.models import load
    from maskattn.tasks.common import TASK_FILE, read_task
    from maskattn.tokenization import Tokenizer
    from maskattn.viz import check_out_directory, replace_earlier_pictures, visualize

    check_out_directory(args.out)
    trained = (Path(args.model) / TASK_FILE).is_file()
    task = tasks().get(read_task(args.model).get("task")) if trained else None
    if task is not None and task.visualize is not None:  # a task with pictures of its own (caption: overlays)
        from maskattn.plotting import plot_overlays

        if args.target is not None:
            raise UsageError(f"--target: the {task.name} task's pictures follow the model's own output; "
                             "drop --target")

        overlays, files = task.visualize(args.model, args.input, args.out)
        written = [*plot_overlays(overlays, args.out), *files]
    else:
        model, tok = load(args.model), Tokenizer.load(args.model)
        length = len(tok.encode(args.input))
        if length > model.config.max_len:
            raise UsageError(f"--input: {length} tokens, more than the model reads (max_len {model.config.max_len}); "
                             "shorten the input")
        written = visualize(model, tok, args.input, args.out, target=args.target)
    replace_earlier_pictures(args.out, written)
    print(f"wrote {len(written)} files to {args.out}; open {written[-1]}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    import torch

    from maskattn.audit import audit_model
    from maskattn.models import BUILT_IN_MODELS, load

    if args.model:
        targets = [(args.model, load(args.model))]
    else:
        torch.manual_seed(0)
        targets = [(f"{cls.__name__} (tiny, {positions} positions)",
                    cls(cls.config_class.preset("tiny", positions=positions)))
                   for cls in BUILT_IN_MODELS for positions in ("sinusoidal", "learned", "rope")]
    ok = True
    for title, model in targets:
        positions = getattr(getattr(model, "config", None), "max_len", None)
        if positions is not None and args.length > positions:
            raise UsageError(f"--length {args.length}: more than the {positions} positions of {title}")
        report = audit_model(model, length=args.length)
        print(f"== {title}\n{report}\n")
        ok &= report.ok
    return 0 if ok else 1


def _showcase(args: argparse.Namespace) -> int:
    from maskattn.showcase import run

    if args.length > MAX_SHOWN:
        raise UsageError(f"--length {args.length}: the showcase draws at most {MAX_SHOWN} positions")
    return 0 if run(length=args.length) < 1e-10 else 1


MAX_SHOWN = 1024  # queries and keys `masks show` and `showcase` draw (a dense picture of L x L)
MAX_STATS_TILES = 2**26  # tiles `masks stats` counts
MAX_STATS_LENGTH = 2**24  # positions: stats does per-position work (~150 bytes each: 2.5 GB here)


def _masks_show(args: argparse.Namespace) -> int:
    from maskattn.masks.expr import parse

    mask = parse(args.expression)
    if args.masks_command == "stats":
        tiles = (-(-args.length // args.block)) ** 2
        if args.length > MAX_STATS_LENGTH:  # else killed for memory after a minute or more
            raise UsageError(f"--length {args.length}: masks stats counts at most {MAX_STATS_LENGTH:,} positions "
                             "(2**24), its memory grows with the length")
        if args.block > MAX_STATS_LENGTH:  # stats pads the positions to whole tiles: else a --block-sized allocation
            raise UsageError(f"--block {args.block}: masks stats takes tiles of at most {MAX_STATS_LENGTH:,} positions "
                             "(2**24)")
        if tiles > MAX_STATS_TILES:
            raise UsageError(f"--length {args.length} with --block {args.block}: {tiles:,} tiles, more than the "
                             f"{MAX_STATS_TILES:,} stats counts; raise --block or lower --length")
        print(repr(mask))
        print(mask.stats(args.length, args.length, block_q=args.block, block_k=args.block, head_dim=args.head_dim))
        return 0
    if args.q_offset < 0:
        raise UsageError(f"--q-offset must be >= 0, got {args.q_offset}")
    keys = args.keys if args.keys is not None else args.q_offset + args.length  # what Mask.render draws
    if max(args.length, keys) > MAX_SHOWN:
        given = f"--keys {keys}" if args.keys is not None else f"--q-offset {args.q_offset}: {keys} keys"
        raise UsageError(f"--length {args.length} / {given}; masks show draws at most {MAX_SHOWN} queries and "
                         f"keys; `maskattn masks stats` summarises longer masks")
    if args.png is not None:
        if not Path(args.png).is_dir() and Path(args.png).suffix.lower() not in (".png", ".svg", ".pdf"):
            raise UsageError(f"--png {args.png}: name a .png (or .svg, .pdf) file")
        check_output_file(args.png, "--png")  # (a directory: refused here)
    print(mask.render(args.length, args.keys, q_offset=args.q_offset))
    if args.png:
        from maskattn.plotting import plot_mask

        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        plot_mask(mask, args.length, args.keys, q_offset=args.q_offset, path=args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
