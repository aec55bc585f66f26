"""The ``advbench`` command line (click). Each command is a thin wrapper over library calls."""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from benchmark.errors import AdvbenchError, UsageError

logger = logging.getLogger("advbench")


class _Group(click.Group):
    """Turns advbench errors into one line on stderr and their exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdvbenchError as exc:
            click.echo(f"advbench: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("advbench: interrupted; finished epochs and rows are saved, rerun to "
                       "resume", err=True)
            ctx.exit(130)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    logging.getLogger("auto-attack").setLevel(max(level, logging.WARNING))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """advbench: train and attack adversarial-training defenses under one protocol."""
    _setup_logging(-1 if quiet else verbose)


def common_options(multi: bool) -> Any:
    def deco(f: Any) -> Any:
        opts = [
            click.option("--dataset", default="mnist5k", show_default=True,
                         help="mnist5k (embedded), mnist, cifar10, cifar100, svhn, synthetic, or "
                              "an image-folder name under --data-dir."),
            click.option("--arch", default=None, help="Backbone (default: the profile's)."),
            click.option("--profile", default="cpu", show_default=True,
                         type=click.Choice(["cpu", "paper"])),
            click.option("--seeds", default="0", show_default=True, help="Comma list, e.g. 0,1,2."),
            click.option("--hparams", default=None, help='JSON overrides, e.g. \'{"beta": 6.0}\'.'),
            click.option("--runs-dir", default="runs", show_default=True, type=click.Path()),
            click.option("--data-dir", default=None, type=click.Path(),
                         help="Root of dataset files (torchvision or image-folder layout)."),
            click.option("--download", is_flag=True, help="Allow torchvision to download data."),
            click.option("--device", default="auto", show_default=True,
                         help="cpu, cuda, cuda:N or auto."),
            click.option("--no-progress", is_flag=True, help="No progress bars."),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be a comma list of integers, got {text!r}") from None


def _configs(defenses: Sequence[str], dataset: str, profile: str, arch: Optional[str],
             seeds: Sequence[int], hparams: Optional[str], scale: str) -> list[Any]:
    """Resolved configs; with several defenses, each takes the --hparams keys it knows."""
    from benchmark.config import parse_hparams, profile_defaults, resolve_run_config
    from defenses import DEFENSES

    user = parse_hparams(hparams)
    known_all = set(profile_defaults(profile, scale, dataset))
    used: set[str] = set()
    cfgs = []
    for name in defenses:
        cls = DEFENSES.get(name)
        known = known_all | set(cls.default_hparams)
        mine = user if len(defenses) == 1 else {k: v for k, v in user.items() if k in known}
        used |= set(mine)
        for seed in seeds:
            cfgs.append(resolve_run_config(name, dataset, profile=profile, arch=arch, seed=seed,
                                           user_hparams=mine, scale=scale))
    unused = set(user) - used
    if unused:
        raise UsageError(f"--hparams keys {sorted(unused)} belong to none of: {', '.join(defenses)}")
    return cfgs


def _scale(dataset: str, data_dir: Optional[str]) -> str:
    from benchmark.data import _INFO, find_image_folder
    if dataset in _INFO:
        return _INFO[dataset].scale
    if find_image_folder(dataset, Path(data_dir) if data_dir else None) is None:
        from benchmark.data import dataset_info
        dataset_info(dataset)  # raises with the list of valid names
    return "cifar"


@cli.command()
@click.option("--defenses", default="all", show_default=True,
              help="all | st,at | 'tr*' (shell wildcards), in registry order.")
@common_options(multi=True)
@click.option("--attacks", default=None, help="Attack columns, e.g. fgsm,pgd (default suite).")
@click.option("--suite", default=None, help="Named attack suite.")
@click.option("--n-examples", type=int, default=None, help="Test points (default: profile's).")
@click.option("--checkpoints", default="best", show_default=True, help="best, last or best,last.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Eval batch size.")
@click.option("--out", default=None, type=click.Path(), help="Report folder [RUNS_DIR/report].")
@click.option("--force", is_flag=True, help="Delete and recompute the selected runs.")
@click.option("--dry-run", is_flag=True, help="List the jobs and their states; run nothing.")
def run(defenses: str, dataset: str, arch: Optional[str], profile: str, seeds: str,
        hparams: Optional[str], runs_dir: str, data_dir: Optional[str], download: bool, device: str,
        no_progress: bool, attacks: Optional[str], suite: Optional[str], n_examples: Optional[int],
        checkpoints: str, batch_size: int, out: Optional[str], force: bool, dry_run: bool) -> None:
    """Train every missing run, evaluate it, and print the comparison table."""
    from benchmark.data import load_dataset
    from benchmark.evaluate import eval_key, evaluate_run
    from benchmark.protocols import resolve_specs
    from benchmark.report import load_rows, write_report
    from benchmark.store import RunStore
    from benchmark.train import train_run
    from defenses import DEFENSES

    t0 = time.perf_counter()
    names = DEFENSES.resolve(defenses)
    scale = _scale(dataset, data_dir)
    cfgs = _configs(names, dataset, profile, arch, _seeds(seeds), hparams, scale)
    specs = resolve_specs(attacks, scale, suite=suite)
    which = [c.strip() for c in checkpoints.split(",") if c.strip()]
    if not set(which) <= {"best", "last"}:
        raise UsageError(f"--checkpoints takes best and/or last, got {checkpoints!r}")
    store = RunStore(runs_dir)
    from benchmark.config import DEFAULT_N_EXAMPLES
    n_key = n_examples if n_examples is not None else DEFAULT_N_EXAMPLES.get(profile)
    states = []
    for cfg in cfgs:
        keys = [eval_key(cfg.run_id, w, s, n_key if n_key is not None else -1)
                for w in which for s in specs]
        states.append(store.state(store.run_dir(cfg), keys).value)
    counts = {s: states.count(s) for s in ("done", "partial", "trained", "new")}
    click.echo(f"{len(cfgs)} jobs: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if dry_run:
        for cfg, st in zip(cfgs, states):
            click.echo(f"{st:8s} {cfg.defense:10s} seed {cfg.seed}  {store.run_dir(cfg)}")
        return
    data = load_dataset(dataset, data_dir, download=download)
    rows = []
    for cfg in cfgs:
        if force and store.run_dir(cfg).exists():
            shutil.rmtree(store.run_dir(cfg))
        run_dir = train_run(cfg, data, store, device=device, progress=not no_progress)
        for w in which:
            rows += evaluate_run(run_dir, specs, checkpoint=w, n_examples=n_examples,
                                 device=device, batch_size=batch_size, data=data,
                                 progress=not no_progress)
    out_dir = Path(out) if out else Path(runs_dir) / "report"
    for md in write_report(load_rows(rows), out_dir):
        click.echo("\n" + md)
    click.echo(f"tables written to {out_dir}/tables; wall time {time.perf_counter() - t0:.1f}s")


@cli.command()
@click.option("--defense", required=True, help="Defense name.")
@common_options(multi=False)
def train(defense: str, dataset: str, arch: Optional[str], profile: str, seeds: str,
          hparams: Optional[str], runs_dir: str, data_dir: Optional[str], download: bool,
          device: str, no_progress: bool) -> None:
    """Train (or resume) one defense; print the run folder(s)."""
    from benchmark.data import load_dataset
    from benchmark.store import RunStore
    from benchmark.train import train_run

    scale = _scale(dataset, data_dir)
    cfgs = _configs([defense], dataset, profile, arch, _seeds(seeds), hparams, scale)
    data = load_dataset(dataset, data_dir, download=download)
    for cfg in cfgs:
        click.echo(str(train_run(cfg, data, RunStore(runs_dir), device=device,
                                 progress=not no_progress)))


@cli.command()
@click.option("--run", "run_paths", multiple=True, required=True, type=click.Path(exists=True),
              help="Run folder (repeatable).")
@click.option("--attacks", default=None, help="Attack columns, e.g. fgsm,pgd.")
@click.option("--suite", default=None, help="Named attack suite.")
@click.option("--n-examples", type=int, default=None)
@click.option("--checkpoint", "which", default="best", show_default=True,
              type=click.Choice(["best", "last"]))
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--data-dir", default=None, type=click.Path())
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Recompute existing rows.")
@click.option("--no-progress", is_flag=True)
def evaluate(run_paths: tuple[str, ...], attacks: Optional[str], suite: Optional[str],
             n_examples: Optional[int], which: str, batch_size: int, data_dir: Optional[str],
             device: str, force: bool, no_progress: bool) -> None:
    """Attack trained runs; rows go to RUN/eval, flags to RUN/flags."""
    from benchmark.evaluate import evaluate_run
    from benchmark.protocols import resolve_specs
    from benchmark.report import load_rows, to_markdown, accuracy_table
    from benchmark.store import read_json

    rows = []
    for path in run_paths:
        cfg = read_json(Path(path) / "config.json")
        specs = resolve_specs(attacks, cfg["data"]["scale"], suite=suite)
        rows += evaluate_run(path, specs, checkpoint=which, n_examples=n_examples, device=device,
                             batch_size=batch_size, data_dir=Path(data_dir) if data_dir else None,
                             force=force, progress=not no_progress)
    click.echo(to_markdown(accuracy_table(load_rows(rows))))


@cli.command()
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path())
@click.option("--rows", "rows_file", default=None, type=click.Path(exists=True),
              help="Build from a rows.jsonl file instead of run folders.")
@click.option("--out", default="results", show_default=True, type=click.Path())
def report(runs_dir: str, rows_file: Optional[str], out: str) -> None:
    """Regenerate the tables from run folders (or a rows.jsonl) into OUT."""
    from benchmark.report import load_rows, write_report

    df = load_rows(rows_file or runs_dir)
    if df.empty:
        raise UsageError(f"no result rows under {rows_file or runs_dir}")
    for md in write_report(df, Path(out)):
        click.echo(md)


@cli.command(name="list")
@click.argument("what", type=click.Choice(["defenses", "attacks", "datasets", "archs", "suites"]),
                default="defenses")
def list_(what: str) -> None:
    """List names, one per line: NAME<TAB>SOURCE<TAB>DESCRIPTION."""
    if what in ("defenses", "attacks"):
        from attacks import ATTACKS
        from defenses import DEFENSES
        reg = DEFENSES if what == "defenses" else ATTACKS
        for e in reg.entries():
            desc = e.error and f"BROKEN: {e.error}" or getattr(e.obj, "description", "")
            click.echo(f"{e.name}\t{e.source}\t{desc}")
    elif what == "datasets":
        from benchmark.data import _INFO
        for name, info in _INFO.items():
            click.echo(f"{name}\tbuilt-in\t{info.provenance}")
    elif what == "archs":
        from benchmark.models import ARCHS
        for name, cls in ARCHS.items():
            click.echo(f"{name}\tbuilt-in\t{(cls.__doc__ or '').strip().splitlines()[0]}")
    else:
        from benchmark.protocols import SUITES
        for name, labels in SUITES.items():
            click.echo(f"{name}\tbuilt-in\t{','.join(labels)}")


@cli.command()
@click.option("--dataset", required=True, type=click.Choice(["mnist", "cifar10", "cifar100",
                                                              "svhn"]))
@click.option("--data-dir", required=True, type=click.Path())
def download(dataset: str, data_dir: str) -> None:
    """Download a dataset with torchvision (the only command that uses the network)."""
    from benchmark.data import load_dataset
    data = load_dataset(dataset, data_dir, download=True)
    click.echo(f"{dataset}: {len(data.train)} train / {len(data.test)} test under {data_dir}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="advbench")


if __name__ == "__main__":  # python -m benchmark.cli
    main()
