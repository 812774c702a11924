"""`chromalab`: the pipeline's stages as subcommands, plus `colorize` and `bench`.

Each stage subcommand does what its DVC stage does (stages/*.py call these), reading params.yaml.
Heavy imports (TensorFlow, MLflow) happen inside the commands so that `--help` is instant.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from chromalab.entry import (exit_code, exit_without_teardown, handle_stop_signals, raise_if_stop_ignored,
                             report_stop, skip_unused_extras, starts_afresh)
from chromalab.errors import ChromalabError, error_line, machine_failure
from chromalab.quiet import quiet_tensorflow

app = typer.Typer(
    help="Learn to colour grayscale photos of people, and colour your own.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("-v", "--verbose",
                                          help="Also show TensorFlow's own start-up and warning lines, and the technical detail of files that can't be read.")] = False,
) -> None:
    quiet_tensorflow(verbose)
    if not verbose:  # a photo's broken EXIF or TIFF tag is read past (the photo is coloured): Pillow's warning
        # is two lines of noise through the progress bar
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


ParamsOpt = Annotated[Path, typer.Option("--params", help="The params file to read.")]
PARAMS = Path("params.yaml")


def _params(path: Path):
    from chromalab.config import load_params

    return load_params(path)


@app.command()
def download(params: ParamsOpt = PARAMS) -> None:
    """Fetch the Unsplash Lite archive (data.url) and extract its tables into data/raw."""
    from chromalab.data.download import run_download

    run_download(_params(params))


@app.command()
def split(params: ParamsOpt = PARAMS) -> None:
    """Select the people subset (or your folder) into train / test / val / reserve lists in data/split."""
    from chromalab.data.split import run_split

    run_split(_params(params))


@app.command()
def images(params: ParamsOpt = PARAMS) -> None:
    """Fetch the selected photos at image_size x image_size into data/images (resumable)."""
    from chromalab.data.images import run_images

    run_images(_params(params))


@app.command()
def tfrecords(params: ParamsOpt = PARAMS) -> None:
    """Convert data/images to normalised Lab TFRecords in data/tfrecords."""
    from chromalab.data.tfrecords import run_tfrecords

    run_tfrecords(_params(params))


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="baseline or gan")],
    params: ParamsOpt = PARAMS,
) -> None:
    """Train one model from data/tfrecords, tracked in MLflow; resumes from its checkpoint."""
    from chromalab.train.stage import run_train

    run_train(_params(params), model)


@app.command()
def evaluate(params: ParamsOpt = PARAMS) -> None:
    """Score both models and the gray floor on the test photos; write reports/evaluate."""
    from chromalab.evaluate.stage import run_evaluate

    run_evaluate(_params(params))


@app.command()
def colorize(
    context: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Photos and/or folders (searched recursively).")],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder (default: beside each input, *_color).")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="gan, baseline, a .keras file, or an MLflow model URI.")] = "gan",
    overwrite: Annotated[bool, typer.Option(help="Replace outputs an earlier run wrote; never a file of yours named as an output would be (x_color.jpg).")] = False,
    compare: Annotated[bool, typer.Option(help="Also write input | colourised side by side.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="At most this many photos per model call (those decoded by then); 1 lets the cores write each photo while the model colours the next.")] = 1,
) -> None:
    """Colour your own photos at their full resolution."""
    from chromalab.colorize import colorize_paths

    report = colorize_paths(
        paths, out_dir=out, model=model, overwrite=overwrite, compare=compare, batch_size=batch_size,
        verbose=context.parent.params["verbose"],  # `chromalab -v colorize …`: the technical detail of bad files
    )
    if report.failed:
        typer.echo(f"{len(report.failed)} of {report.total} photo(s) failed (listed above).", err=True)
        raise typer.Exit(1)


@app.command()
def serve(
    model: Annotated[str, typer.Option("--model", "-m", help="gan, baseline, a .keras file, or an MLflow model URI (models:/chromalab-gan@champion).")] = "gan",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this computer only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free one).")] = 8000,
    # max: `inf` passed min and failed every upload with a 500 (a 1 TB limit is no limit a photo meets)
    max_upload_mb: Annotated[float, typer.Option(min=0.001, max=1e6, help="Largest photo file accepted, in MB.")] = 50.0,
) -> None:
    """A local web page to colour photos in the browser: drop photos, compare, download."""
    from chromalab.serve.app import run_serve

    run_serve(model, host=host, port=port, max_upload_mb=max_upload_mb)


@app.command()
def bench(
    out: Annotated[Path, typer.Option("-o", "--out", help="Where the JSON report goes.")] = Path("bench/report.json"),
    image_size: Annotated[int, typer.Option(help="Image size for the training steps.")] = 256,
    batch: Annotated[list[int], typer.Option(help="Batch sizes to measure (repeat the option).")] = [1, 8],
    width: Annotated[float, typer.Option(help="Channel-width multiplier.")] = 1.0,
    precision: Annotated[str, typer.Option(help="float32, mixed_bfloat16 or mixed_float16.")] = "float32",
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per measurement (after warm-up).")] = 5,
    only: Annotated[Optional[list[str]], typer.Option(help="Subset: gan, baseline, loop, input, tfrecords, colorize.")] = None,
    peak_tflops: Annotated[Optional[float], typer.Option(help="Device peak for the utilisation column.")] = None,
    xla: Annotated[Optional[bool], typer.Option("--xla/--no-xla", help="XLA for the training steps (default: on a GPU only).")] = None,
    records: Annotated[Optional[Path], typer.Option(help="TFRecords folder for the loop rows (default: the bench's own photos).")] = None,
) -> None:
    """Measure training (step and whole loop), input-pipeline, tfrecords and colorize throughput on this device."""
    from chromalab.bench import run_bench

    starts_afresh()  # a re-run measures everything again (the finished rows stay in the report until then)
    run_bench(
        out=out, image_size=image_size, batches=batch, width=width, precision=precision,
        steps=steps, only=only, peak_tflops=peak_tflops, xla=xla, records=records,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 1, not a traceback."""
    skip_unused_extras()  # before any command imports Keras
    try:
        # Without standalone mode Typer returns, not raises, a command's typer.Exit code (and Ctrl-C's 130)
        code = app(args=argv, standalone_mode=False, prog_name="chromalab")
    except ChromalabError as exc:
        typer.echo(error_line(str(exc)), err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C, or SIGTERM (chromalab.entry.handle_stop_signals)
        sys.exit(report_stop())
    except typer.TyperException as exc:  # usage errors (unknown command/option, bad value), Typer's own click
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "chromalab"
        if message := exc.format_message().rstrip("."):  # none: the help was shown instead (no arguments given)
            typer.echo(error_line(f"{message} (see `{command} --help`)"), err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if (message := machine_failure(exc)) is None:
            raise  # a bug: its traceback
        typer.echo(error_line(message), err=True)
        sys.exit(1)
    if code == 130:  # Typer's own Ctrl-C
        code = report_stop()
    if isinstance(code, int) and code:
        sys.exit(code)


def run(argv: list[str] | None = None) -> None:
    """The `chromalab` program: `main`, then leave without the interpreter's teardown (chromalab.entry).
    In-process callers (tests) use `main`, which returns."""
    handle_stop_signals()  # SIGTERM as Ctrl-C: a training's MLflow run ends KILLED, not RUNNING for ever
    try:
        main(argv)
        raise_if_stop_ignored()  # one raised in a destructor (evaluate's plots): the command went on, yet was stopped
        code = 0
    except KeyboardInterrupt:
        code = report_stop()
    except SystemExit as exc:
        code = exit_code(exc)
    exit_without_teardown(code)
