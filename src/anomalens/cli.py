"""`anomalens <command>`: argparse over the public API (DESIGN §3.5); parsing and printing only.

Each command calls library functions (`detect`, `run_eval`, `run_demo`, `Method.fit`, ...) whose
parameters are named like its flags; `_call` fills them from the parsed flags. The flags several
commands share, and the argument types, are a table in `anomalens.cli_options`. Modules are imported
inside the commands, so ``--help`` loads no model code. Errors: one line on stderr, ``anomalens: error:
<message>``, exit code 1 (2 for usage errors); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from anomalens.methods.base import Method

PROG = "anomalens"
SHOWN_ROWS = 20  # detect prints its rows when there are at most this many
RESOLUTION_HELP = "score at each image's resolution, or at the model's input size as official code"
Handler = Callable[["argparse.Namespace"], "int | None"]


# ---------------------------------------------------------------------- commands
# Each handler returns its exit code, or None for 0.
def cmd_list(args: argparse.Namespace) -> None:
    from anomalens.catalog import listing  # read from the sources: no torch

    print(listing())


def cmd_detect(args: argparse.Namespace) -> int | None:
    from anomalens.detect import detect
    from anomalens.onnx_model import OnnxModel

    if args.onnx and (args.checkpoint or args.method or args.support):
        _usage_error("--onnx replaces --checkpoint/--method/--support (the export holds its support set)")
    main = _join_torchrun()
    result = _call(detect, args, model=OnnxModel(args.onnx) if args.onnx else _model(args))
    if not main:  # every process holds the merged result; rank 0 reports it
        return 1 if result.failures else 0
    print(result.report(SHOWN_ROWS))
    for failure in result.failures:
        _warn(failure)
    if result.failures:
        total = len(result.failures) + len(result.rows)
        raise ValueError(f"{len(result.failures)} of {total} image(s) unreadable")


def cmd_train(args: argparse.Namespace) -> None:
    from anomalens.engine import MODEL_FILE, train_method
    from anomalens.training import train

    if not args.method:
        _usage_error("give --method")
    flags = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "amp": args.amp or None}
    overrides = args.train_options | {k: v for k, v in flags.items() if v is not None}
    run = _call(train, args, train_method, **overrides)
    path = Path(args.out_dir) / MODEL_FILE  # written by the engine after every epoch
    print(f"trained {run.method.name} on {run.dataset.name} ({len(run.dataset)} images): {path}")
    print(f"next: anomalens eval --checkpoint {path} --data <kind>:<root>")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from anomalens.reproduce import markdown, reproduce

    result = _call(reproduce, args)
    print(markdown(result["method"], result["rows"]))
    print(f"results: {Path(args.out) / 'results.json'} and {Path(args.out) / 'table.md'}")


def cmd_eval(args: argparse.Namespace) -> None:
    import anomalens.data as al_data
    from anomalens.evaluation import evaluate_method, markdown_table
    from anomalens.protocols import run_eval, run_protocol

    for spec in args.data:  # a mistyped spec fails before a large model is loaded
        al_data.parse_spec(spec)
    main = _join_torchrun()
    given = {"method": _model(args), "dataset_or_specs": args.data}
    results = _call(run_eval, args, run_protocol, evaluate_method, **given)
    if not main:
        return
    print(markdown_table(results))
    print(f"results: {Path(args.out) / 'results.json'} and {Path(args.out) / 'results.md'}")
    if args.report:
        print(f"report: {Path(args.out) / 'report.html'}")


def cmd_bench(args: argparse.Namespace) -> None:
    from anomalens.bench import benchmark, write_bench
    from anomalens.methods.base import list_methods

    results = _call(benchmark, args, methods=args.methods or list_methods())
    print(write_bench(results, args.out))
    print(f"results: {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from anomalens.demo import check_transfer, demo_summary, run_demo

    run = _call(run_demo, args, device="cpu" if args.device == "auto" else args.device)
    print(demo_summary(run, args.out))
    check_transfer(run)


def cmd_data(args: argparse.Namespace) -> None:
    from anomalens.data import DataError
    from anomalens.data.report import describe_spec

    report = _call(describe_spec, args)
    print(report.summary())
    if report.problems:
        raise DataError(f"{len(report.problems)} file(s) of {args.spec} cannot be read (listed above)")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from anomalens.calibrate import calibrate, calibrate_checkpoint

    if (args.data is None) == (args.normals is None):
        _usage_error("calibrate needs --data SPEC or --normals FILES (one of them)")
    result, path = _call(calibrate_checkpoint, args, calibrate)
    print(f"{result.summary()} stored in {path}")


def cmd_convert(args: argparse.Namespace) -> None:
    from anomalens.converters import convert

    options = args.options | ({"backbone": args.backbone} if args.backbone else {})
    options |= {} if args.pretrained == "default" else {"pretrained": args.pretrained}
    method = convert(args.source, args.checkpoint, **options)
    print(f"wrote {method.save(args.out)} ({method.name}, backbone {method.backbone.name})")


def cmd_serve(args: argparse.Namespace) -> None:
    from anomalens.serve import run

    _call(run, args, model=_model(args), log_level="warning" if args.quiet else "info")


def cmd_export(args: argparse.Namespace) -> None:
    from anomalens.detect import expand_inputs
    from anomalens.export import export_onnx

    support = expand_inputs(args.support) if args.support else None
    path = export_onnx(_model(args), args.out, args.class_names, support=support, opset=args.opset)
    print(f"wrote {path} (classes: {', '.join(args.class_names)}; precision {args.precision})")


def _call(fn: Callable[..., Any], args: argparse.Namespace, *also: Callable[..., Any], **given: Any) -> Any:
    """``fn(**given, **flags)``: flags are the parsed options named like a parameter of `fn`, or like a
    keyword-only parameter of a function in `also` (which receives `fn`'s ``**options``)."""
    import inspect

    def names(f: Callable[..., Any], kinds: tuple[Any, ...]) -> set[str]:
        return {n for n, p in inspect.signature(f).parameters.items() if p.kind in kinds}

    named = names(fn, (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    named = named.union(*(names(f, (inspect.Parameter.KEYWORD_ONLY,)) for f in also))
    return fn(**given, **{k: v for k, v in vars(args).items() if k in named and k not in given})


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``anomalens: error: <message> (see '<prog> --help')``."""

    def error(self, message: str) -> NoReturn:
        _usage_error(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The `anomalens` argument parser (global options are accepted before or after the command)."""
    from anomalens.cli_options import MODEL, add_shared, names, positive_ints, shots_or_full
    from anomalens.converters import SOURCES
    from anomalens.demo import DEMO_METHODS
    from anomalens.protocols import PROTOCOLS
    from anomalens.recipes import RECIPE_NAMES

    parser = _Parser(prog=PROG, description="Vision-language anomaly detection and segmentation.")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    def command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _global_options(p, suppress=True)
        p.set_defaults(handler=handler)
        return p

    command("list", cmd_list, "list methods and backbones")

    p = command("detect", cmd_detect, "score images (files, folders, globs): scores.csv + heatmap PNGs")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or glob patterns")
    add_shared(p, *MODEL, "--precision", "--support", "--class-name", "--threshold")
    p.add_argument("--out", default="runs/detect", help="output folder (default runs/detect)")
    add_shared(p, "--batch-size")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlays")
    p.add_argument("--no-heatmaps", dest="heatmaps", action="store_false", help="write scores only")
    add_shared(p, "--workers")
    p.add_argument("--onnx", help="an exported model (.onnx), run with ONNX Runtime instead of torch")

    p = command("train", cmd_train, "train a method on dataset(s) and write <out>/model.anomalens")
    add_shared(p, *MODEL[1:], "--data")
    p.add_argument("--split", help="split to train on (default: the recipe's, else test, as the papers)")
    add_shared(p, "--classes")
    recipe_help = "the released code's or paper's settings (docs/recipes.md)"
    p.add_argument("--recipe", choices=RECIPE_NAMES, help=recipe_help)
    p.add_argument("--out", dest="out_dir", metavar="OUT", required=True, help="run folder (model, logs)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add_shared(p, "--epochs", "--lr")
    add_shared(p, "--batch-size", default=None)
    shots_help = "training subset per class (method's meaning), or 'full'"
    p.add_argument("--shots", type=shots_or_full, help=shots_help)
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast on CUDA (default fp32)")
    p.add_argument("--stages", type=names, help="comma-separated training stages to run (default all)")
    p.add_argument("--normal-only", action="store_true", help="train on normal images (CoRe-CLIP C.1)")
    add_shared(p, "--train-set")

    help = "a method's paper protocol end to end, beside the published table"
    p = command("reproduce", cmd_reproduce, help)
    p.add_argument("method", help="aa-clip, crane, crane+, inctrl, inctrlv2 or core-clip")
    p.add_argument("--data-root", required=True, help="folder with mvtec/, visa/ (and caad/ for core-clip)")
    weights_help = "converted official checkpoint: DATASET=FILE (dataset trained on)"
    p.add_argument("--weights", action="append", help=weights_help)
    add_shared(p, "--backbone", "--pretrained")
    add_shared(p, "--set", help="method option on top of the recipe's; repeatable")
    add_shared(p, "--train-set", help="training option on top of the recipe's (epochs=1); repeatable")
    add_shared(p, "--batch-size", help="evaluation batch size")
    p.add_argument("--out", default="runs/reproduce")

    p = command("eval", cmd_eval, "evaluate a checkpoint or method: results.json, markdown table, report")
    add_shared(p, *MODEL, "--precision", "--data")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    add_shared(p, "--classes")
    p.add_argument("--protocol", choices=PROTOCOLS, help="default: from --shots and --seeds")
    p.add_argument("--shots", type=positive_ints, help="K normal support images per class, e.g. 4 or 1,2,4")
    p.add_argument("--seeds", type=int, help="support draws per K (generalist protocol; default 3)")
    p.add_argument("--support-seed", type=int, default=0, help="seed of the (first) support draw")
    p.add_argument("--eval-resolution", choices=("input", "model"), default="input", help=RESOLUTION_HELP)
    p.add_argument("--aupro", dest="aupro_variant", choices=("mvtec", "sampled"), default="mvtec")
    p.add_argument("--report", action="store_true", help="also write <out>/report.html with heatmaps")
    p.add_argument("--out", default="runs/eval")
    add_shared(p, "--batch-size", "--workers")

    p = command("bench", cmd_bench, "throughput, latency, memory, FLOPs and the ratio to matmul throughput")
    p.add_argument("--methods", type=names, help="comma-separated methods (default all)")
    add_shared(p, "--backbone", help="backbone for every method (default each method's)")
    add_shared(p, "--pretrained")
    add_shared(p, "--set", help="option for every benchmarked method; repeatable")
    add_shared(p, "--precision")
    p.add_argument("--batch-sizes", type=positive_ints, default=[1, 8])
    p.add_argument("--image-size", type=int, default=512, help="side of the synthetic input images")
    p.add_argument("--iters", type=int, default=10, help="timed batches per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--shots", type=int, default=1, help="support images for few-shot methods")
    p.add_argument("--probe-size", type=int, default=2048, help="side of the matmul-throughput probe")
    p.add_argument("--out", default="runs/bench")

    help = "offline demo: zero-shot transfer to unseen synthetic classes (anomalens-mini, CPU, ~1 min)"
    p = command("demo", cmd_demo, help)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--method", help=f"trainable method (default the first of {', '.join(DEMO_METHODS)})")
    add_shared(p, "--epochs", help="override the demo schedule")
    add_shared(p, "--lr")
    add_shared(p, "--batch-size", default=None)
    p.add_argument("--n", type=int, default=16, help="synthetic images per class and label")
    p.add_argument("--size", type=int, default=48, help="synthetic image side")
    add_shared(p, "--classes", help="subset of the held-out classes to evaluate on (default all six)")

    p = command("data", cmd_data, "describe a dataset spec and verify that every image and mask decodes")
    p.add_argument("spec", help="dataset spec, e.g. mvtec:/data/mvtec")
    p.add_argument("--split", choices=("train", "test", "all"), default="all")
    add_shared(p, "--classes")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="counts only, decode nothing")

    p = command("calibrate", cmd_calibrate, "store a verdict threshold in a checkpoint")
    p.add_argument("--checkpoint", required=True)
    add_shared(p, "--pretrained", help="override the stored tag")
    p.add_argument("--data", help="labelled dataset spec (F1-max threshold) or normal-only (percentile)")
    p.add_argument("--split", default="test")
    add_shared(p, "--classes")
    p.add_argument("--normals", nargs="+", help="normal images (files, folders, globs): percentile rule")
    p.add_argument("--rule", choices=("auto", "percentile", "f1"), default="auto")
    p.add_argument("--percentile", type=float, default=99.0)
    add_shared(p, "--support", "--class-name", "--batch-size")
    p.add_argument("--out", help="write the calibrated checkpoint here (default: update --checkpoint)")

    p = command("convert", cmd_convert, "convert an official checkpoint into an anomalens model file")
    p.add_argument("checkpoint", help="the official checkpoint file")
    p.add_argument("--from", dest="source", required=True, choices=sorted(SOURCES), help="official code base")
    p.add_argument("--out", required=True, help="output model file (.anomalens)")
    add_shared(p, "--backbone", "--pretrained")
    add_shared(p, "--set", help="method/converter option, e.g. configuration=crane+ for Crane; repeatable")

    p = command("serve", cmd_serve, "HTTP API and web page over a model (the [serve] extra; docs/serve.md)")
    add_shared(p, *MODEL, "--precision")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    add_shared(p, "--class-name", default="object", help="class of requests that name none")
    p.add_argument("--support", help="folder of normal images (few-shot): its own, or sub-folders per class")
    add_shared(p, "--threshold")
    p.add_argument("--max-batch-size", type=int, default=8, help="images per micro-batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for a batch to fill (default 5)")
    p.add_argument("--max-queue", type=int, default=64, help="queued images before 503 (default 64)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="request size limit, 413 (default 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, 413 (default 40e6)")
    p = command("export", cmd_export, "export a model to ONNX (docs/export.md): scores and maps, no torch")
    add_shared(p, *MODEL, "--precision")
    help = "class to bake in (repeatable)"
    p.add_argument("--class-name", dest="class_names", action="append", required=True, help=help)
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default onnx)")
    add_shared(p, "--support", help="normal images baked in (few-shot methods)")
    p.add_argument("--out", required=True, help="output file (.onnx)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `anomalens` console script; returns the exit code."""
    try:
        return _run(build_parser(), argv)
    except SystemExit as exit_:  # usage errors and --help
        return exit_.code if isinstance(exit_.code, int) else 1


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Warnings and library log records become "anomalens: warning: ..." lines, unless --debug.
    log_handler = logging.StreamHandler(sys.stderr)
    log_handler.setLevel(logging.WARNING)
    log_handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger()
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = lambda message, *_a, **_k: _warn(str(message))
            root.addHandler(log_handler)
        try:
            # Listing runs no model; `detect --onnx` draws no random number from torch and must not
            # import it.
            if args.handler is not cmd_list:
                from anomalens.memory import retain_freed_memory

                retain_freed_memory()  # reuse freed activations instead of faulting in fresh pages
                if not getattr(args, "onnx", None):
                    from anomalens.engine.trainer import seed_everything

                    seed_everything(args.seed)
            args.progress = not args.quiet
            return args.handler(args) or 0
        except KeyboardInterrupt:
            print(f"{PROG}: error: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # every failure becomes one line unless --debug
            if args.debug:
                traceback.print_exc()
            print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
            return 1
        finally:
            root.removeHandler(log_handler)


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


# ---------------------------------------------------------------------- helpers
def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--device", default=default("auto"), help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=default(0), help="random seed (default 0)")
    parser.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", default=default(False), help="no progress bars")


def _join_torchrun() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), so that `eval`/`detect` shard
    their images over the processes; True on the process that prints (rank 0, or no torchrun)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from anomalens.engine import distributed

    distributed.setup()
    return distributed.is_main()


def _model(args: argparse.Namespace) -> Method:
    """The method named by --checkpoint or --method (+ --backbone/--pretrained/--set), in --precision."""
    from anomalens.methods import create, load

    if args.checkpoint and args.method:
        _usage_error("give --checkpoint or --method, not both")
    if not (args.checkpoint or args.method):
        _usage_error("give --checkpoint or --method")
    if args.checkpoint and (args.options or args.backbone):
        _usage_error("--set/--backbone apply to --method; a checkpoint stores its own")
    if args.checkpoint:
        model = load(args.checkpoint, device=args.device, pretrained=args.pretrained)
    else:
        model = create(args.method, args.backbone, args.pretrained, args.device, **args.options)
    return model.set_precision(args.precision)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) or not text:  # KeyError's str is just the quoted key
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {' '.join(message.split())}", file=sys.stderr)


def _usage_error(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
