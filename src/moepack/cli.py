"""The `moepack` command line: convert, verify, inspect, recipes, demo.

Exit codes (see `moepack.errors`): 0 success; 1 a check failed (verify found mismatches, demo
outputs disagreed); 2 the input is unusable or the call is wrong (click's own usage errors are 2
as well); 130 interrupted. Errors become exit codes in one place, `_Command.invoke`: an
anticipated error (`MoepackError`, `OSError`) prints one line, or a JSON error object on stdout
with `--json`, and no traceback unless `MOEPACK_DEBUG=1`.

Imports stay light: torch, huggingface_hub and tqdm load only inside the commands that need
them, so `--help`, `inspect` and `verify` start fast and run on a runtime-only install.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import click

from moepack.errors import EXIT_INTERRUPTED, EXIT_UNUSABLE, MoepackError
from moepack.format.constants import B12X_MODES, TARGETS
from moepack.format.flashinfer import DEFAULT_PAD_TILE, PAD_TILES
from moepack.sizes import human_bytes

log = logging.getLogger("moepack")


def _setup(verbose: int) -> None:
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2), format="%(levelname)s %(name)s: %(message)s"
    )


_TRUTHY = ("1", "true", "yes", "on")
PROGRESS_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")
"""Either set (1/true/yes/on) turns progress bars off, on a terminal too (tqdm reads its own
variable only as a default, which an explicit `disable=False` overrides)."""


def _meta() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    return ctx.meta if ctx is not None else {}


def _quiet() -> bool:
    return bool(_meta().get("moepack.quiet"))


def _show_progress(as_json: bool) -> bool:
    """Progress bars on stderr only for a person watching: a terminal, no --json, --quiet or
    --no-progress, and neither progress variable set."""
    if as_json or _quiet() or _meta().get("moepack.no_progress"):
        return False
    if any(os.environ.get(var, "").strip().lower() in _TRUTHY for var in PROGRESS_ENV):
        return False
    return sys.stderr.isatty()


def _say(text: str) -> None:
    """Informational output (summaries, notes): silent under --quiet."""
    if not _quiet():
        click.echo(text)


def _os_message(exc: OSError) -> str:
    """`path: permission denied`, not `[Errno 13] Permission denied: 'path'`."""
    reason = (exc.strerror or str(exc)).strip()
    reason = reason[:1].lower() + reason[1:]
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def _emit(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, indent=2))


def _debug() -> bool:
    return os.environ.get("MOEPACK_DEBUG", "") not in ("", "0")


def _fail(error: dict[str, Any], code: int, as_json: bool) -> NoReturn:
    """Report an error (stderr line, or the JSON object on stdout) and exit with `code`."""
    if _debug():
        traceback.print_exc()
    if as_json:
        _emit({"ok": False, "exit_code": code, "error": error})
    else:
        click.echo(f"moepack: error: {error['message']}", err=True)
    raise click.exceptions.Exit(code)


class _Command(click.Command):
    """Every moepack command: the one place where errors become exit codes, and where the
    options every command takes (--quiet, --no-progress) are added and applied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(
                ["-q", "--quiet"],
                is_flag=True,
                help="Print only results and errors: no progress bars, notes, log lines or "
                "success summaries (a failed check still lists what failed).",
            ),
            click.Option(
                ["--no-progress"],
                is_flag=True,
                help="No progress bars (also HF_HUB_DISABLE_PROGRESS_BARS=1 or TQDM_DISABLE=1).",
            ),
        ]

    def invoke(self, ctx: click.Context) -> Any:
        as_json = bool(ctx.params.get("as_json"))
        ctx.meta["moepack.quiet"] = bool(ctx.params.pop("quiet", False))
        ctx.meta["moepack.no_progress"] = bool(ctx.params.pop("no_progress", False))
        if ctx.meta["moepack.quiet"]:
            logging.getLogger("moepack").setLevel(logging.ERROR)
        try:
            return super().invoke(ctx)
        except MoepackError as exc:
            _fail(exc.to_dict(), exc.exit_code, as_json)
        except OSError as exc:  # permission denied, ...: the input is unusable
            error: dict[str, Any] = {"type": type(exc).__name__, "message": _os_message(exc)}
            if exc.filename is not None:
                error["path"] = str(exc.filename)
            _fail(error, EXIT_UNUSABLE, as_json)
        except KeyboardInterrupt as exc:  # the library may say what was kept
            message = str(exc) or "interrupted"
            _fail({"type": "KeyboardInterrupt", "message": message}, EXIT_INTERRUPTED, as_json)


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moepack", prog_name="moepack")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Convert NVFP4 MoE checkpoints offline for SM12x kernels, verify and inspect artifacts."""
    _setup(verbose)


@main.command()
@click.argument("source")
@click.option("--target", type=click.Choice(TARGETS), required=True, help="GPU family to serve on.")
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), required=True, help="Artifact directory."
)
@click.option("--revision", help="Hub branch, tag or commit (default: the recipe's, else main).")
@click.option(
    "--b12x-scales",
    type=click.Choice(B12X_MODES),
    default="baked",
    show_default=True,
    help="baked: what TensorRT-LLM's b12x backend consumes (lossy). shared: exact, reuses the "
    "CUTLASS scales via input_global_scale; derived from FlashInfer 0.7.x source, not yet run "
    "on SM12x hardware.",
)
@click.option(
    "--pad-tile",
    type=click.Choice([str(t) for t in PAD_TILES]),
    default=str(DEFAULT_PAD_TILE),
    show_default=True,
    help="Tile the intermediate size is padded to. 256: used as stored by FlashInfer 0.7.2, "
    "0.7.2.post1 (what vLLM 0.33 and SGLang 0.5.23 pin) and 0.7.4. 128: smaller (Nemotron 3 "
    "Super 2688 instead of 2816), but FlashInfer before 0.7.4 copies every weight of each "
    "layer at run time.",
)
@click.option("--moe-only", is_flag=True, help="Write only the MoE layers (no pass-through files).")
@click.option("--overwrite", is_flag=True, help="Replace a finished artifact at --out.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the per-layer arithmetic runs (cpu, cuda).",
)
@click.option(
    "--exact-fidelity",
    is_flag=True,
    help="Measure the baked-scale error on every expert (default: 64 evenly spaced a layer).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def convert(
    source: str,
    target: str,
    out: Path,
    revision: str | None,
    b12x_scales: str,
    pad_tile: str,
    moe_only: bool,
    overwrite: bool,
    device: str,
    exact_fidelity: bool,
    as_json: bool,
) -> None:
    """Convert SOURCE (recipe alias, hub repo id or local directory) into an artifact."""
    from moepack.convert.pipeline import convert_checkpoint

    summary = convert_checkpoint(
        source,
        out,
        target=target,
        b12x_scales=b12x_scales,
        pad_tile=int(pad_tile),
        moe_only=moe_only,
        revision=revision,
        overwrite=overwrite,
        progress=_show_progress(as_json),
        device=device,
        exact_fidelity=exact_fidelity,
    )
    if as_json:
        _emit({"ok": True, **summary})
        return
    _say(
        f"converted {summary['moe_layers']} MoE layers -> {summary['artifact']} "
        f"({human_bytes(summary['bytes'])}, {summary['seconds']:.1f} s, "
        f"b12x {summary['b12x_scale_mode']}: max rel err {summary['b12x_max_rel_err']:.4f})"
    )
    if summary["kept_files"]:
        rewritten = summary["written_files"]
        _say(
            f"kept {len(summary['kept_files'])} files of an earlier run "
            f"({summary['kept_layers']} MoE layer{'s' if summary['kept_layers'] != 1 else ''}) "
            "after checking their size and sha256"
            + (f"; rewrote {len(rewritten)}: {', '.join(rewritten)}" if rewritten else "")
        )
    if summary["b12x_scale_mode"] == "shared":
        _say(
            "note: shared b12x scales follow FlashInfer 0.7.x's input_global_scale path, derived "
            "from its source and not yet run on SM12x hardware"
        )
    if summary["gate_up_requantized_experts"]:
        _say(
            f"note: {summary['gate_up_requantized_experts']} experts had unequal gate/up "
            "weight_scale_2; the smaller half's block scales were requantized (see inspect)"
        )


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Structure, headers and sizes; no hashing.")
@click.option("--jobs", type=click.IntRange(1), help="Files hashed in parallel (default: cores).")
@click.option("--source", "source", help="Also re-derive sampled layers from this checkpoint.")
@click.option(
    "--sample",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Layers re-derived with --source.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify(
    artifact: Path, quick: bool, jobs: int | None, source: str | None, sample: int, as_json: bool
) -> None:
    """Check every byte of ARTIFACT against its manifest."""
    from moepack.runtime.verify import verify_artifact

    report = verify_artifact(artifact, quick=quick, jobs=jobs, progress=_show_progress(as_json))
    extra: list[str] = []
    if source and report.exit_code == 0:
        from moepack.convert.crosscheck import crosscheck

        extra = crosscheck(artifact, source, sample=sample)
    code = report.exit_code or (1 if extra else 0)
    if as_json:
        _emit({**report.to_dict(), "ok": code == 0, "source_mismatches": extra, "exit_code": code})
        sys.exit(code)
    if code == 0 and _quiet():
        sys.exit(code)
    if extra:  # the files hold, the source says otherwise: the headline must say FAILED
        click.echo(
            f"FAILED: {artifact}: {len(extra)} sampled layer(s) differ from {source} "
            f"(the files themselves match the manifest: {report.stats()})"
        )
        for line in extra:
            click.echo(f"  source: {line}")
    else:
        click.echo(report.format_text())
        if source and report.exit_code == 0:
            click.echo(f"source: sampled layers re-derived from {source} match")
    sys.exit(code)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Describe ARTIFACT: source, target, geometry, layers, scale mode, sizes, fidelity."""
    from moepack.runtime.inspect import describe, format_description

    info = describe(artifact)
    if as_json:
        _emit(info)
    else:
        click.echo(format_description(info))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def recipes(as_json: bool) -> None:
    """List the model aliases `convert` accepts."""
    from moepack.recipes import recipes as all_recipes

    found = all_recipes()
    if as_json:
        _emit(found)
        return
    for alias, r in sorted(found.items()):
        click.echo(f"{alias:24} {r['repo_id']}@{r.get('revision', 'main')}")


@main.command()
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    help="Keep the checkpoint and artifact here (default: a temporary directory).",
)
@click.option(
    "--variant",
    type=click.Choice(["super", "nano", "gated"]),
    default="super",
    show_default=True,
    help="Synthetic checkpoint to build.",
)
@click.option("--b12x-scales", type=click.Choice(B12X_MODES), default="shared", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo(workdir: Path | None, variant: str, b12x_scales: str, as_json: bool) -> None:
    """Offline end to end: synthetic checkpoint -> convert -> verify -> load -> forward."""
    from moepack.convert.demo import run_demo

    result = run_demo(
        workdir, variant=variant, b12x_scales=b12x_scales, progress=_show_progress(as_json)
    )
    if as_json:
        _emit(result)
    elif not (result["ok"] and _quiet()):
        click.echo(result["text"])
    sys.exit(0 if result["ok"] else 1)
