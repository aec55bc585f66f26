"""The ``advbench`` command line (click). Each command is a thin wrapper over library calls."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from benchmark.errors import AdvbenchError, UsageError
from benchmark.logs import setup_logging
from benchmark.validate import (NON_NEGATIVE, POSITIVE, checkpoints_option, device_option,
                                seeds_option, writable_dir_option)

logger = logging.getLogger("advbench")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (files are written atomically; a rerun resumes)."""


#: the longest error line the CLI prints (user input echoed in a message is cut to fit)
MAX_ERROR_CHARS = 2000


def _one_line(text: object) -> str:
    line = " ".join(str(text).split()) or "(no message)"
    if len(line) > MAX_ERROR_CHARS:
        line = f"{line[:MAX_ERROR_CHARS]}... ({len(line) - MAX_ERROR_CHARS} more characters cut)"
    return line


class _Group(click.Group):
    """Turns advbench errors and OSErrors into one line on stderr and their exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdvbenchError as exc:
            click.echo(f"advbench: error: {_one_line(exc)}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # full disk, permissions, a file where a folder should be
            click.echo(f"advbench: error: {_one_line(exc)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            click.echo(f"advbench: {what}; finished epochs and rows are saved, rerun to "
                       "resume", err=True)
            ctx.exit(143 if isinstance(exc, Terminated) else 130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
def cli(verbose: int, quiet: bool, debug: bool) -> None:
    """advbench: train and attack adversarial-training defenses under one protocol."""
    setup_logging(-1 if quiet else verbose)


def common_options(multi: bool) -> Any:
    def deco(f: Any) -> Any:
        opts = [
            click.option("--dataset", default="mnist5k", show_default=True,
                         help="mnist5k (embedded), mnist, cifar10, cifar100, svhn, synthetic, or "
                              "an image-folder name under --data-dir."),
            click.option("--arch", default=None, help="Backbone (default: the profile's)."),
            click.option("--profile", default="cpu", show_default=True,
                         type=click.Choice(["cpu", "paper"])),
            click.option("--seeds", default="0", show_default=True, callback=seeds_option,
                         help="Comma list, e.g. 0,1,2."),
            click.option("--hparams", default=None, help='JSON overrides, e.g. \'{"beta": 6.0}\'.'),
            click.option("--runs-dir", default="runs", show_default=True, type=click.Path(),
                         callback=writable_dir_option),
            click.option("--data-dir", default=None, type=click.Path(),
                         help="Root of dataset files (torchvision or image-folder layout)."),
            click.option("--download", is_flag=True, help="Allow torchvision to download data."),
            click.option("--device", default="auto", show_default=True,
                         callback=device_option, help="cpu, cuda, cuda:N or auto."),
            click.option("--no-progress", is_flag=True, help="No progress bars."),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def checkpoint_options(f: Any) -> Any:
    """--checkpoint, --batch-size, --data-dir, --device: the options of commands that attack
    a trained checkpoint."""
    for opt in reversed([
        click.option("--checkpoint", "which", default="best", show_default=True,
                     type=click.Choice(["best", "last"])),
        click.option("--batch-size", type=POSITIVE, default=None,
                     help="Eval batch size [256 on CPU, 512-1024 on a GPU]."),
        click.option("--data-dir", default=None, type=click.Path()),
        click.option("--device", default="auto", show_default=True, callback=device_option),
        click.option("--threads", type=POSITIVE, default=None,
                     help="torch intra-op threads [OMP_NUM_THREADS if set, else every core].")]):
        f = opt(f)
    return f


@cli.command()
@click.option("--defenses", default="all", show_default=True,
              help="all | st,at | 'tr*' (shell wildcards), in registry order.")
@common_options(multi=True)
@click.option("--attacks", default=None, help="Attack columns, e.g. fgsm,pgd (default suite).")
@click.option("--suite", default=None, help="Named attack suite.")
@click.option("--n-examples", type=POSITIVE, default=None,
              help="Test points (default: profile's).")
@click.option("--checkpoints", default="best", show_default=True, callback=checkpoints_option,
              help="best, last or best,last.")
@click.option("--batch-size", type=POSITIVE, default=None,
              help="Eval batch size [256 on CPU, 512-1024 on a GPU].")
@click.option("--out", default=None, type=click.Path(), callback=writable_dir_option,
              help="Report folder [RUNS_DIR/report].")
@click.option("--force", is_flag=True, help="Delete and recompute the selected runs.")
@click.option("--dry-run", is_flag=True, help="List the jobs and their states; run nothing.")
@click.option("--launcher", default="auto", show_default=True,
              type=click.Choice(["auto", "serial", "local", "submitit"]),
              help="auto: the whole machine (local with one job per CPU core or GPU when "
                   "jobs can run side by side, else serial); serial: in this process; local: "
                   "one subprocess per job; submitit: Slurm.")
@click.option("--jobs", "parallel", type=POSITIVE, default=None,
              help="auto/local launcher: jobs at a time [one per GPU (group), else one per "
                   "CPU core].")
@click.option("--gpus-per-job", type=POSITIVE, default=1, show_default=True,
              help="DDP processes per job (local: torchrun; submitit: Slurm tasks).")
@click.option("--cluster", default=None,
              help="submitit cluster: slurm [auto-detected], local or debug.")
@click.option("--executor-params", default=None,
              help='submitit parameters as JSON, e.g. \'{"slurm_partition": "gpu", '
                   '"timeout_min": 2880}\'.')
@click.option("--share-cores/--fixed-threads", default=False, show_default=True,
              help="local launcher on CPU: --share-cores lets running jobs take the cores of "
                   "jobs that ended (faster; on CPU the convolution's last bits then depend on "
                   "timing); the default keeps each job on cores/jobs threads, so a rerun "
                   "repeats bit for bit.")
def run(defenses: str, dataset: str, arch: Optional[str], profile: str, seeds: str,
        hparams: Optional[str], runs_dir: str, data_dir: Optional[str], download: bool, device: str,
        no_progress: bool, attacks: Optional[str], suite: Optional[str], n_examples: Optional[int],
        checkpoints: str, batch_size: Optional[int], out: Optional[str], force: bool,
        dry_run: bool, launcher: str, parallel: Optional[int], gpus_per_job: int,
        cluster: Optional[str], executor_params: Optional[str],
        share_cores: bool = False) -> None:
    """Train every missing run, evaluate it, and print the comparison table."""
    from benchmark.sweep import sweep

    result = sweep(defenses, dataset, arch=arch, profile=profile, seeds=seeds, hparams=hparams,
                   runs_dir=runs_dir, data_dir=data_dir, download=download, device=device,
                   progress=not no_progress, attacks=attacks, suite=suite,
                   n_examples=n_examples, checkpoints=checkpoints, batch_size=batch_size,
                   out=out, force=force, dry_run=dry_run, launcher=launcher, parallel=parallel,
                   gpus_per_job=gpus_per_job, cluster=cluster, executor_params=executor_params,
                   share_cores=share_cores,
                   on_plan=lambda planned: click.echo(planned.counts()))
    if dry_run:
        click.echo("\n".join(result.listing()))
        return
    for md in result.tables:
        click.echo("\n" + md)
    click.echo("\nWhere the time went (wall and CPU seconds of each job's process; jobs ran "
               "side by side):\n\n" + result.phases)
    click.echo(f"{len(result.jobs)} jobs via {result.launcher}; tables written to "
               f"{result.out_dir}/tables; wall time {result.wall_s:.1f}s")


@cli.command()
@click.option("--defense", required=True, help="Defense name.")
@common_options(multi=False)
@click.option("--ddp", "nproc", type=POSITIVE, default=None,
              help="Train each run with DDP on N local processes (= torchrun "
                   "--nproc_per_node=N -m benchmark.cli train ...).")
@click.option("--sync-bn", is_flag=True, help="DDP: BatchNorm statistics over the global "
                                              "batch (SyncBatchNorm; CUDA only).")
def train(defense: str, dataset: str, arch: Optional[str], profile: str, seeds: str,
          hparams: Optional[str], runs_dir: str, data_dir: Optional[str], download: bool,
          device: str, no_progress: bool, nproc: Optional[int], sync_bn: bool) -> None:
    """Train (or resume) one defense; print the run folder(s).

    Under torchrun (WORLD_SIZE > 1) or with --ddp N, each run is trained with
    DistributedDataParallel; the global batch stays the run's batch_size.
    """
    from benchmark.config import parse_seeds
    from benchmark.data import dataset_scale
    from benchmark.run import distributed
    from benchmark.run.launch import TrainJob

    job = TrainJob(defense, dataset, runs_dir, arch=arch, profile=profile,
                   seeds=tuple(parse_seeds(seeds)), hparams=hparams, data_dir=data_dir,
                   download=download, device=device, progress=not no_progress, sync_bn=sync_bn)
    if nproc is not None and nproc > 1 and distributed.env_world_size() <= 1:
        dataset_scale(dataset, data_dir)  # fail on a bad name before starting processes
        distributed.launch_local(nproc, _train_and_print, (job,))
    else:
        _train_and_print(job)


def _train_and_print(job: Any) -> None:
    """The body of ``advbench train`` (also each process of ``--ddp``): rank 0 prints."""
    from benchmark.run.launch import train_job

    for run_dir in train_job(job):
        click.echo(str(run_dir))


@cli.command()
@click.option("--run", "run_paths", multiple=True, type=click.Path(exists=True),
              help="Run folder (repeatable).")
@click.option("--checkpoint-file", "ckpt_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Any advbench checkpoint file (repeatable); rows go to --out.")
@click.option("--attacks", default=None,
              help="Attack columns, e.g. fgsm,pgd,pgd@4/255,pgd-k50 ('all' for every one).")
@click.option("--suite", default=None,
              help="Named suite: table1, table2, table3, table6, table7, table8, fig4, sanity, "
                   "default (see `advbench list suites`); `rejection` runs the detector "
                   "evaluation (benchmark.eval.rejection).")
@click.option("--eps", default=None, help="Comma list of eps overriding every column's, "
                                          "e.g. 2/255,4/255.")
@click.option("--n-examples", type=POSITIVE, default=None,
              help="First N test points (default: the profile's, capped per attack).")
@checkpoint_options
@click.option("--out", default=None, type=click.Path(), callback=writable_dir_option,
              help="Result folder for --checkpoint-file [<file stem>-eval beside the file].")
@click.option("--force", is_flag=True, help="Recompute existing rows.")
@click.option("--no-progress", is_flag=True)
@click.option("--cascade", is_flag=True,
              help="Headline only, for less: per norm and eps the attacks run cheapest first, "
                   "each on the points every earlier one left robust (no single-attack "
                   "accuracies; benchmark.eval.cascade).")
@click.option("--ood-data-dir", default=None, type=click.Path(),
              help="--suite rejection: the folder holding the OOD source (MNIST for CIFAR-scale "
                   "runs, CIFAR-10 for MNIST-scale runs) [--data-dir]; its parent is not read.")
@click.option("--robustbench", "zoo_name", default=None,
              help="A RobustBench zoo model (e.g. Wong2020Fast) as a baseline: rows go to "
                   "RUNS_DIR/<dataset>/rb-NAME/ (needs the zoo extra).")
@click.option("--threat", default="Linf", show_default=True, type=click.Choice(["Linf", "L2"]),
              help="--robustbench: RobustBench threat model.")
@click.option("--dataset", default=None,
              help="--robustbench: cifar10 [default] or cifar100; --model-file: the dataset "
                   "(cifar10, mnist, ..., or an image-folder name under --data-dir).")
@click.option("--model-file", "model_file", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="A model trained anywhere, in a file that runs no code when loaded: "
                   "safetensors weights (with --arch) or a torch.export .pt2. Inputs in "
                   "[0,1], logits out. Rows go to RUNS_DIR/<dataset>/<name>/<id>/.")
@click.option("--arch", default=None,
              help="--model-file: architecture of safetensors weights (advbench list archs, "
                   "or a timm model name if timm is installed).")
@click.option("--name", default=None, help="--model-file: the rows' defense label [file stem].")
@click.option("--randomized", is_flag=True, help="--model-file: the forward is random on "
                                                 "purpose (attacked with EOT).")
@click.option("--model-dir", default="models", show_default=True, type=click.Path(),
              help="--robustbench: weights in RobustBench's layout DIR/<dataset>/<threat>/NAME.pt.")
@click.option("--download", is_flag=True, help="--robustbench: let robustbench download "
                                               "missing weights.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(),
              help="--robustbench: where the zoo model's rows go.")
@click.option("--profile", default="paper", show_default=True, type=click.Choice(["cpu", "paper"]),
              help="--robustbench/--model-file: report section and default test points.")
def evaluate(run_paths: tuple[str, ...], ckpt_files: tuple[str, ...], attacks: Optional[str],
             suite: Optional[str], eps: Optional[str], n_examples: Optional[int], which: str,
             batch_size: Optional[int], data_dir: Optional[str], device: str,
             out: Optional[str], force: bool, no_progress: bool, zoo_name: Optional[str],
             threat: str, dataset: Optional[str], model_file: Optional[str],
             arch: Optional[str], name: Optional[str], randomized: bool, model_dir: str,
             download: bool, runs_dir: str, profile: str,
             ood_data_dir: Optional[str] = None, cascade: bool = False,
             threads: Optional[int] = None) -> None:
    """Attack trained runs, checkpoint files, a model file or a RobustBench model; rows go to
    RUN/eval."""
    from benchmark.eval.evaluate import evaluate_path, format_rows
    from benchmark.cores import use_all_cores

    use_all_cores(threads)

    if not run_paths and not ckpt_files and not zoo_name and not model_file:
        raise UsageError("give --run RUN_DIR, --checkpoint-file FILE, --model-file FILE or "
                         "--robustbench NAME")
    if model_file:
        if run_paths or ckpt_files or zoo_name or suite or cascade:
            raise UsageError("--model-file is evaluated alone (no --run, --checkpoint-file, "
                             "--robustbench, --suite or --cascade)")
        result = _evaluate_model_file(model_file, arch, dataset, data_dir, name, eps, threat,
                                      n_examples, profile, attacks or "standard", False,
                                      randomized, None, None, device, runs_dir, batch_size,
                                      not no_progress)
        click.echo(format_rows([r for r in result.rows if r.get("kind") == "attack"]))
        click.echo(str(result))
        click.echo(f"rows: {result.out_dir}")
        return
    if cascade and (zoo_name or suite == "rejection"):
        raise UsageError("--cascade applies to attack suites of --run / --checkpoint-file")
    if suite == "rejection":
        from benchmark.eval.rejection import evaluate_rejection, format_rejection
        if ckpt_files or zoo_name or attacks or eps:
            raise UsageError("--suite rejection takes --run folders only (no --attacks/--eps)")
        click.echo(format_rejection([r for path in run_paths for r in evaluate_rejection(
            path, checkpoint=which, n_examples=n_examples, device=device,
            batch_size=batch_size, data_dir=Path(data_dir) if data_dir else None,
            force=force, ood_data_dir=Path(ood_data_dir) if ood_data_dir else None)]))
        return
    rows = []
    if zoo_name:
        from benchmark.eval.zoo import evaluate_zoo
        rows += evaluate_zoo(zoo_name, threat=threat, dataset=dataset or "cifar10",
                             model_dir=model_dir,
                             runs_dir=runs_dir, profile=profile, download=download,
                             attacks=attacks, suite=suite, eps=eps, n_examples=n_examples,
                             device=device, batch_size=batch_size or 256,
                             data_dir=Path(data_dir) if data_dir else None, force=force,
                             progress=not no_progress)
    for path in [*run_paths, *ckpt_files]:
        rows += evaluate_path(path, attacks=attacks, suite=suite, eps=eps, checkpoint=which,
                              n_examples=n_examples, device=device,
                              batch_size=batch_size,
                              data_dir=Path(data_dir) if data_dir else None, force=force,
                              progress=not no_progress, out_dir=out, cascade=cascade)
    click.echo(format_rows(rows))


@cli.command()
@click.option("--run", "run_paths", multiple=True, type=click.Path(exists=True),
              help="Run folder (repeatable).")
@click.option("--model-file", "model_file", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="A model trained anywhere (safetensors + --arch, or a .pt2; see advbench "
                   "evaluate --help): the default suite (fgsm, pgd) runs first, then the checks.")
@click.option("--arch", default=None, help="--model-file: architecture of safetensors weights.")
@click.option("--dataset", default=None, help="--model-file: the dataset.")
@click.option("--name", default=None, help="--model-file: the rows' defense label [file stem].")
@click.option("--source-arch", default=None,
              help="Architecture of a safetensors --source [--arch].")
@click.option("--randomized", is_flag=True, help="--model-file: random forward on purpose.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(),
              help="--model-file: where its rows go.")
@click.option("--profile", default="paper", show_default=True, type=click.Choice(["cpu", "paper"]),
              help="--model-file: report section.")
@click.option("--threat", default="Linf", show_default=True,
              type=click.Choice(["Linf", "L2", "L1"]), help="--model-file: threat model.")
@click.option("--eps", default=None, help="Comma list of ε to check [the run's nominal ε].")
@click.option("--n-examples", type=POSITIVE, default=None,
              help="Points [those of the run's AutoAttack row, else 100 cpu / 1000 paper].")
@click.option("--checks", "names", default=None,
              help="Comma list of checks [all]: (a) aa-vs-pgd, aa-vs-pgd-l2, aa-vs-pgd-l1, "
                   "(b) eps-monotone, (c) unbounded-eps, (d) square, transfer, (e) more-budget, "
                   "(f) zero-gradient, (g) fgsm-vs-pgd, (h) incomplete-opt, (i) unstable, "
                   "(j) binarization, (k) rays, (l) noise, (m) bpda, (n) adaptive; 'health' "
                   "for the training-health "
                   "verdict only (always written). A stale check row (older check version) is "
                   "recomputed.")
@click.option("--cheap", is_flag=True, help="Only what `advbench run` checks (nothing costly "
                                            "that is not stored).")
@click.option("--source", default=None, type=click.Path(exists=True),
              help="Transfer source: a run folder, an advbench checkpoint, or a model file "
                   "(safetensors + --source-arch, or .pt2) [the `st` run of the protocol; "
                   "none for --model-file: the transfer check is then skipped, and says so].")
@click.option("--cascade", is_flag=True,
              help="No verdicts: the headline the checks' attacks give, for less (cheapest "
                   "first, each on the points every earlier one left robust).")
@click.option("--no-progress", is_flag=True, help="No progress bar (--cascade).")
@checkpoint_options
def check(run_paths: tuple[str, ...], model_file: Optional[str], arch: Optional[str],
          dataset: Optional[str], name: Optional[str], source_arch: Optional[str],
          randomized: bool, runs_dir: str, profile: str, threat: str, eps: Optional[str],
          n_examples: Optional[int], names: Optional[str], cheap: bool, source: Optional[str],
          which: str, batch_size: Optional[int], data_dir: Optional[str], device: str,
          cascade: bool = False, no_progress: bool = False,
          threads: Optional[int] = None) -> None:
    """Training-health and gradient-masking verdicts; rows go to RUN/eval (kind health/check)."""
    from benchmark.eval.checks import CHECKS, check_run, format_checks
    from benchmark.cores import use_all_cores

    use_all_cores(threads)
    from benchmark.run.protocols import parse_eps_list

    chosen = [c.strip() for c in names.split(",") if c.strip() and c.strip() != "health"] \
        if names else list(CHECKS)
    bad = sorted(set(chosen) - set(CHECKS))
    if bad:
        raise UsageError(f"unknown checks {bad}; valid: {', '.join(CHECKS)}")
    if bool(run_paths) == bool(model_file):
        raise UsageError("give --run RUN_DIR (repeatable) or --model-file FILE")
    if model_file:
        if cascade:
            raise UsageError("--cascade applies to --run folders")
        result = _evaluate_model_file(
            model_file, arch, dataset, data_dir, name, eps, threat, n_examples, profile,
            "fgsm,pgd" if threat == "Linf" else "standard",
            "cheap" if cheap else chosen if names else True, randomized, source,
            source_arch or arch, device, runs_dir, batch_size, False)
        click.echo(format_checks([r for r in result.rows if r.get("kind") == "check"]))
        click.echo(str(result))
        return
    rows = []
    for path in run_paths:
        rows += check_run(path, eps=parse_eps_list(eps), n_examples=n_examples, names=chosen,
                          cheap=cheap, checkpoint=which, device=device, batch_size=batch_size,
                          data_dir=Path(data_dir) if data_dir else None, source=source,
                          cascade=cascade, progress=not no_progress)
    if cascade:
        from benchmark.eval.evaluate import format_rows
        click.echo(format_checks([r for r in rows if r.get("kind") in ("health", "check")]))
        click.echo(format_rows([r for r in rows if r.get("kind") in ("cascade", "headline")]))
        return
    click.echo(format_checks(rows))
    for r in rows:
        if r.get("check") == "transfer" and r.get("status") == "skipped":
            click.echo(f"note: {r['defense']} seed {r['seed']}: the transfer check (d) was not "
                       f"run, so the verdict lacks it: {r['detail']}")


def _evaluate_model_file(path: str, arch: Optional[str], dataset: Optional[str],
                         data_dir: Optional[str], name: Optional[str], eps: Optional[str],
                         threat: str, n_examples: Optional[int], profile: str, attacks: str,
                         checks: Any, randomized: bool, source: Optional[str],
                         source_arch: Optional[str], device: str, runs_dir: str,
                         batch_size: Optional[int], progress: bool) -> Any:
    """``--model-file``: open the file without running code from it and hand the model to
    :func:`benchmark.api.evaluate_model` (the Python API's path, the same rows)."""
    import re

    from benchmark.api import evaluate_on_data
    from benchmark.config import DEFAULT_N_EXAMPLES
    from benchmark.data import load_dataset
    from benchmark.modelfile import load_model_file, sniff
    from benchmark.run.protocols import parse_eps_list

    if not dataset:
        raise UsageError("--model-file needs --dataset (cifar10, mnist, ...)")
    eps_list = parse_eps_list(eps)
    if eps_list and len(eps_list) != 1:
        raise UsageError("--model-file takes one --eps")
    kind = sniff(Path(path))
    data = load_dataset(dataset, data_dir)
    model = load_model_file(path, arch, data.info)
    src: Any = None
    if source is not None:
        sp = Path(source)
        src = load_model_file(sp, source_arch, data.info) if sp.is_file() and \
            sniff(sp) in ("safetensors", "pt2") else sp
    label = name or re.sub(r"[^A-Za-z0-9._+-]", "-", Path(path).stem).lstrip("._+-") or "model"
    return evaluate_on_data(model, data, threat_model=threat,
                            eps=eps_list[0] if eps_list else None,
                            n_examples=n_examples or DEFAULT_N_EXAMPLES.get(profile),
                            attacks=attacks, checks=checks, randomized=randomized, source=src,
                            device=device, name=label,
                            arch=arch if kind == "safetensors" else None, runs_dir=runs_dir,
                            profile=profile, batch_size=batch_size, progress=progress,
                            model_source=str(path))


@cli.command(name="false-alarms")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path())
@click.option("--rows", "rows_file", default=None, type=click.Path(exists=True),
              help="Read a rows.jsonl file instead of run folders.")
@click.option("--defenses", default=",".join(("st", "at", "trades", "pm-ed-wta")),
              show_default=True, help="Honest defenses (comma list).")
def false_alarms_cmd(runs_dir: str, rows_file: Optional[str], defenses: str) -> None:
    """How often each check fails on honest defenses (run `advbench check` on them first)."""
    from benchmark.eval.checks import false_alarms
    from benchmark.report.report import valid_rows

    if not rows_file and not Path(runs_dir).is_dir():
        raise UsageError(f"--runs-dir {runs_dir} is not a folder (or give --rows FILE)")
    source = Path(rows_file or runs_dir)
    rows, skipped = valid_rows(source)  # the same rows `advbench report` accepts
    if skipped and not rows:
        raise UsageError(f"no valid rows in {source}: {len(skipped)} invalid line(s), first "
                         f"{skipped[0]}")
    if skipped:
        logging.getLogger(__name__).warning("%s: skipped %d invalid line(s), first %s", source,
                                            len(skipped), skipped[0])
    chosen = [d.strip() for d in defenses.split(",") if d.strip()]
    if not chosen:
        raise UsageError("--defenses is empty")
    click.echo(false_alarms(rows, chosen))


@cli.command()
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path())
@click.option("--rows", "rows_file", default=None, type=click.Path(exists=True),
              help="Build from a rows.jsonl file instead of run folders.")
@click.option("--out", default="results", show_default=True, type=click.Path(),
              callback=writable_dir_option)
@click.option("--no-plots", is_flag=True, help="Tables only.")
@click.option("--print/--no-print", "echo", default=True, show_default=True,
              help="Print the Markdown tables.")
@click.option("--robustbench-json", "rb_json", default=None, type=click.Path(),
              help="Also write RobustBench model_info JSON files under this folder.")
def report(runs_dir: str, rows_file: Optional[str], out: str, no_plots: bool, echo: bool,
           rb_json: Optional[str]) -> None:
    """Regenerate every table (CSV + Markdown) and figure from run folders or a rows.jsonl.

    Writes OUT/rows.jsonl (so `--rows OUT/rows.jsonl` rebuilds the same tables),
    OUT/tables/<table>_<dataset>_<profile>.{csv,md,tex}, OUT/tables/missing.csv, OUT/report.md,
    OUT/plots/*.png and the leaderboard page OUT/index.html.
    """
    from benchmark.report.report import load_records, write_report
    from benchmark.run.cost import cost_rows
    from benchmark.validate import is_result_row
    from defenses import DEFENSES, catalog

    records = load_records(rows_file or runs_dir,
                           extra=cost_rows(runs_dir) if not rows_file else ())
    if not records:
        raise UsageError(f"no result rows under {rows_file or runs_dir}")
    if not any(is_result_row(r) for r in records):
        refused = [r for r in records if r.get("kind") == "refused"]
        if refused:
            raise UsageError(f"no evaluation rows under {rows_file or runs_dir}: {len(refused)} "
                             f"run(s) refused by evaluation, e.g. {refused[0].get('defense')}: "
                             f"{refused[0].get('reason')}")
        raise UsageError(f"no evaluation rows under {rows_file or runs_dir}, only {len(records)} "
                         f"training/health row(s); run advbench evaluate first")
    mds = write_report(records, Path(out), plots=not no_plots, order=DEFENSES.names(),
                       catalog=catalog())
    for md in mds if echo else []:
        click.echo(md)
    if rb_json:
        from benchmark.report.robustbench import write_model_info
        click.echo(f"{len(write_model_info(records, Path(rb_json), order=DEFENSES.names(), catalog=catalog()))} RobustBench model_info "
                   f"files under {rb_json}")
    pngs = [] if no_plots else sorted((Path(out) / "plots").glob("*.png"))
    click.echo(f"{len(records)} rows -> {len(mds)} tables under {out}/tables"
               + (f", {len(pngs)} plots under {out}/plots" if pngs else ""))


@cli.command()
@click.option("--run", "run_paths", multiple=True, required=True, type=click.Path(exists=True),
              help="Run folder (repeatable).")
@click.option("--n-examples", type=POSITIVE, default=None, help="Test points (default: profile's).")
@click.option("--checkpoint", "which", default="best", show_default=True,
              type=click.Choice(["best", "last"]))
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@click.option("--data-dir", default=None, type=click.Path())
@click.option("--device", default="auto", show_default=True, callback=device_option)
@click.option("--force", is_flag=True, help="Recompute existing rows.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def features(run_paths: tuple[str, ...], n_examples: Optional[int], which: str, batch_size: int,
             data_dir: Optional[str], device: str, force: bool, no_progress: bool) -> None:
    """Feature-space metrics (Table 4: FDR, AFS, SCR, MeanSep, MinSep), clean and PGD-20."""
    from tqdm.auto import tqdm

    from benchmark.eval.features import evaluate_features

    for path in tqdm(run_paths, desc="features", unit="run", disable=no_progress, leave=False):
        for r in evaluate_features(path, checkpoint=which, n_examples=n_examples, device=device,
                                   batch_size=batch_size, data_dir=data_dir, force=force):
            click.echo(f"{r['defense']}\tseed {r['seed']}\t{r['condition']}\t" + "\t".join(
                f"{k}={r[k]:.4f}" for k in ("fdr", "afs", "scr", "mean_sep", "min_sep")))


@cli.command()
@click.option("--run", "run_paths", multiple=True, type=click.Path(exists=True),
              help="Run folder of a CIFAR-10 model (repeatable; needed unless --generate).")
@click.option("--data-dir", required=True, type=click.Path(),
              help="Folder with CIFAR-10-C's <corruption>.npy and labels.npy (or its parent); "
                   "with --generate, the folder to write them to.")
@click.option("--corruptions", default=None, help="Comma list (default: every .npy present; "
                                                   "with --generate, all 19).")
@click.option("--n-examples", type=POSITIVE, default=None,
              help="Images per severity (default: profile's).")
@click.option("--checkpoint", "which", default="best", show_default=True,
              type=click.Choice(["best", "last"]))
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, callback=device_option)
@click.option("--force", is_flag=True, help="Recompute existing rows (with --generate: rewrite "
                                            "existing files, also of other settings).")
@click.option("--generate", is_flag=True,
              help="Regenerate CIFAR-10-C into --data-dir from CIFAR-10's test images "
                   "(make_cifar_c.py's CIFAR parameters), then evaluate any --run.")
@click.option("--dataset", default="cifar10", show_default=True,
              help="--generate: source dataset (cifar10 torchvision layout, or an image-folder "
                   "name such as cifar10-jpeg).")
@click.option("--source-dir", default=None, type=click.Path(exists=True),
              help="--generate: root of the source dataset's files (as --data-dir elsewhere).")
@click.option("--n-images", type=POSITIVE, default=None,
              help="--generate: the first N test images (default: all 10,000).")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True,
              help="--generate: seed of the corruptions' random draws.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def corruptions(run_paths: tuple[str, ...], data_dir: str, corruptions: Optional[str],
                n_examples: Optional[int], which: str, batch_size: int, device: str,
                force: bool, generate: bool, dataset: str, source_dir: Optional[str],
                n_images: Optional[int], seed: int, no_progress: bool) -> None:
    """Accuracy on CIFAR-10-C per corruption and severity (Table 5, Figure 3).

    With --generate, first writes CIFAR-10-C (official layout, plus PROVENANCE.json) from the
    test images of --dataset; rows and tables built on it say "regenerated CIFAR-10-C".
    """
    from benchmark.eval.corruptions import evaluate_corruptions

    names = [c.strip() for c in corruptions.split(",") if c.strip()] if corruptions else None
    if not generate and not run_paths:
        raise UsageError("corruptions needs --run RUN (or --generate to write CIFAR-10-C)")
    if not generate and not Path(data_dir).exists():
        raise UsageError(f"Invalid value for '--data-dir': Path '{data_dir}' does not exist.")
    if generate:
        from benchmark.eval.cifar_c import generate as make_cifar_c

        meta = make_cifar_c(data_dir, dataset, source_dir, n_images=n_images, seed=seed,
                            corruptions=names, force=force, progress=not no_progress)
        click.echo(f"{data_dir}: regenerated CIFAR-10-C, {len(meta['corruptions'])} corruptions "
                   f"× 5 severities × {meta['n_images']} images (seed {seed}); "
                   f"{sum(meta['wall_s'].values()):.0f} s")
    for path in run_paths:
        rows = evaluate_corruptions(path, data_dir, checkpoint=which, n_examples=n_examples,
                                    corruptions=names, device=device, batch_size=batch_size,
                                    force=force and not generate)
        agg = [r for r in rows if r.get("aggregate")]
        if agg:
            r = agg[-1]
            click.echo(f"{r['defense']}\tseed {r['seed']}\tavg {100 * r['accuracy']:.2f}%\t"
                       + " ".join(f"s{s}={100 * v:.2f}"
                                  for s, v in r["accuracy_by_severity"].items()))


@cli.command()
@click.option("--at", "at_run", required=True, type=click.Path(exists=True),
              help="Run folder of the AT model (arch lenets++).")
@click.option("--adv-dpnp", "dpnp_run", required=True, type=click.Path(exists=True),
              help="Run folder of the Adv-DPNP model (arch lenets++).")
@click.option("--out", default="results/plots/figure2.png", show_default=True,
              type=click.Path())
@click.option("--n-examples", type=POSITIVE, default=None, help="Test points (default: profile's).")
@click.option("--checkpoint", "which", default="best", show_default=True,
              type=click.Choice(["best", "last"]))
@click.option("--data-dir", default=None, type=click.Path())
@click.option("--device", default="auto", show_default=True, callback=device_option)
def figure2(at_run: str, dpnp_run: str, out: str, n_examples: Optional[int], which: str,
            data_dir: Optional[str], device: str) -> None:
    """Figure 2: 2-D LeNets++ features, clean and adversarial, AT vs Adv-DPNP."""
    from benchmark.report import plots
    from benchmark.eval.features import figure2_panels

    panels = [figure2_panels(p, checkpoint=which, n_examples=n_examples, device=device,
                             data_dir=data_dir) for p in (at_run, dpnp_run)]
    plots.save(plots.figure2(panels), out)
    click.echo(f"{out}: " + ", ".join(f"{p['defense']} clean {100 * p['clean_acc']:.1f}% adv "
                                      f"{100 * p['adv_acc']:.1f}%" for p in panels))


@cli.command()
@click.option("--run", "run_paths", multiple=True, required=True, type=click.Path(exists=True),
              help="Run folder (repeatable).")
@click.option("--n-examples", type=POSITIVE, default=100, show_default=True,
              help="The first N test points.")
@click.option("--train-points", type=click.IntRange(min=0), default=512, show_default=True,
              help="Training points for the training-attack comparison (0: skip).")
@click.option("--no-components", is_flag=True,
              help="Skip AutoAttack's components on the PGD-robust points.")
@click.option("--checkpoint", "which", default="best", show_default=True,
              type=click.Choice(["best", "last"]))
@click.option("--data-dir", default=None, type=click.Path())
@click.option("--device", default="auto", show_default=True, callback=device_option)
@click.option("--force", is_flag=True, help="Recompute stored results.")
@click.option("--json", "json_out", default=None, type=click.Path(),
              help="Also write every result as one JSON list.")
def diagnose(run_paths: tuple[str, ...], n_examples: int, train_points: int,
             no_components: bool, which: str, data_dir: Optional[str], device: str,
             force: bool, json_out: Optional[str]) -> None:
    """Why PGD overstates a model: saturation, CE vs scale-free losses, AutoAttack's parts."""
    from benchmark.eval.diagnose import diagnose_run, format_diagnoses
    from benchmark.store import atomic_write_json

    results = [diagnose_run(p, checkpoint=which, n_examples=n_examples,
                            train_points=train_points, components=not no_components,
                            device=device, data_dir=data_dir, force=force)
               for p in run_paths]
    if json_out:
        atomic_write_json(Path(json_out), results)
    click.echo(format_diagnoses(results))


@cli.command()
@click.option("--runs-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Runs folder holding the variants and the reference runs.")
@click.option("--dataset", required=True, help="Dataset of the rows, e.g. mnist.")
@click.option("--defense", default="adv-dpnp", show_default=True, help="The ablated defense.")
@click.option("--reference", default="at", show_default=True, help="The baseline defense.")
@click.option("--arch", default=None, help="Backbone of the rows (default: any).")
@click.option("--attacks", default=",".join(("fgsm", "pgd", "cw", "autoattack")),
              show_default=True, help="Attacks of the per-sample worst case.")
@click.option("--checkpoint", "which", default="best", show_default=True,
              type=click.Choice(["best", "last"]))
@click.option("--out", default=None, type=click.Path(), help="Also write the table here (.md).")
@click.option("--json", "json_out", default=None, type=click.Path(),
              help="Also write the numbers as one JSON list.")
def ablation(runs_dir: str, dataset: str, defense: str, reference: str, arch: Optional[str],
             attacks: str, which: str, out: Optional[str], json_out: Optional[str]) -> None:
    """Ablation table: each hyperparameter variant of a defense against its full method and AT."""
    from benchmark.config import optional_defaults
    from benchmark.report.ablation import collect, summarise, to_markdown
    from benchmark.report.report import load_records
    from benchmark.safepath import atomic_write_bytes
    from benchmark.store import atomic_write_json
    from defenses import DEFENSES

    for name in (defense, reference):
        if name not in DEFENSES:
            raise UsageError(f"unknown defense {name!r} (advbench list defenses)")
    names = [a.strip() for a in attacks.split(",") if a.strip()]
    if not names:
        raise UsageError("--attacks is empty")
    cls = DEFENSES.get(defense)
    defaults = {**cls.default_hparams, **optional_defaults(cls)}
    records = load_records(Path(runs_dir))
    archs = sorted({str(r.get("arch")) for r in records if r.get("dataset") == dataset
                    and r.get("defense") in (defense, reference)})
    if arch is None and len(archs) > 1:
        raise UsageError(f"rows of several backbones ({', '.join(archs)}): pass --arch")
    variants = collect(records, defense=defense, reference=reference,
                       defaults=defaults, dataset=dataset, arch=arch, checkpoint=which)
    if not any(v.headline(names) for v in variants):
        raise UsageError(f"no {defense}/{reference} run in {runs_dir} on {dataset} has rows of "
                         f"every attack of {','.join(names)}")
    rows = summarise(variants, names, reference)
    text = to_markdown(rows, names, title=f"{defense} ablations on {dataset} ({which} checkpoint)")
    if out:
        atomic_write_bytes(Path(out), text.encode())
    if json_out:
        atomic_write_json(Path(json_out), rows)
    click.echo(text, nl=False)


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
        from benchmark.run.protocols import SUITE_EPS, SUITES, format_eps
        for name, labels in SUITES.items():
            grids = "; ".join(f"{scale} eps {','.join(format_eps(e) for e in grid)}"
                              for scale, grid in SUITE_EPS.get(name, {}).items())
            click.echo(f"{name}\tbuilt-in\t{','.join(labels)}" + (f"\t[{grids}]" if grids else ""))
        click.echo("rejection\tbuilt-in\tdetector score vs pgd, adaptive, OOD "
                   "(benchmark.eval.rejection)")


@cli.command()
@click.option("--dataset", required=True, type=click.Choice(["mnist", "cifar10", "cifar100",
                                                              "svhn"]))
@click.option("--data-dir", required=True, type=click.Path())
def download(dataset: str, data_dir: str) -> None:
    """Download a dataset with torchvision (the only command that uses the network)."""
    from benchmark.data import load_dataset
    data = load_dataset(dataset, data_dir, download=True)
    click.echo(f"{dataset}: {len(data.train)} train / {len(data.test)} test under {data_dir}")


@cli.command()
@click.option("--defense", default="at", show_default=True, help="Defense name.")
@click.option("--arch", default="small-cnn", show_default=True, help="Backbone.")
@click.option("--dataset", default="cifar10", show_default=True,
              help="Input shape and classes (random data; nothing is loaded).")
@click.option("--profile", default="paper", show_default=True, type=click.Choice(["cpu", "paper"]))
@click.option("--batch-size", type=POSITIVE, default=128, show_default=True)
@click.option("--device", default="auto", show_default=True, callback=device_option)
@click.option("--steps", type=POSITIVE, default=3, show_default=True, help="Timed training steps.")
@click.option("--warmup", type=NON_NEGATIVE, default=1, show_default=True,
              help="Untimed steps first.")
@click.option("--reps", type=POSITIVE, default=3, show_default=True,
              help="Timed repetitions of each plain forward/backward measurement.")
@click.option("--amp", default="none", show_default=True, type=click.Choice(["none", "bf16"]))
@click.option("--channels-last", is_flag=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the training model.")
@click.option("--attacks", default=None,
              help="Evaluation attacks to time ('' for none) [fgsm,pgd; with --run the default "
                   "suite and AutoAttack: fgsm,pgd,autoattack].")
@click.option("--eval-samples", type=POSITIVE, default=None,
              help="Samples per attack [batch size].")
@click.option("--hparams", default=None, help="JSON hyperparameter overrides.")
@click.option("--threads", type=POSITIVE, default=None, help="torch intra-op threads [torch's].")
@click.option("--json", "json_path", default=None, type=click.Path(),
              help="Also write the measurements as JSON.")
@click.option("--run", "run_path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Evaluation side on this trained run: CPU-seconds per point of each of "
                   "--attacks, AutoAttack through advbench vs pyautoattack directly, and a full "
                   "check (nothing written into the run).")
@click.option("--n-examples", type=POSITIVE, default=None,
              help="--run: first N test points [each attack's profile default].")
@click.option("--no-check", is_flag=True, help="--run: skip the full check.")
@click.option("--data-dir", default=None, type=click.Path(), help="--run: the run's dataset.")
@click.option("--cascade", is_flag=True, help="--run: also time `check --cascade`.")
@click.option("--ab-reps", type=NON_NEGATIVE, default=3, show_default=True,
              help="--run: interleaved pairs of AutoAttack through advbench vs pyautoattack "
                   "directly (median ratio; 0 skips the comparison).")
def bench(defense: str, arch: str, dataset: str, profile: str, batch_size: int, device: str,
          steps: int, warmup: int, reps: int, amp: str, channels_last: bool, compile_: bool,
          attacks: Optional[str], eval_samples: Optional[int], hparams: Optional[str],
          threads: Optional[int], json_path: Optional[str], run_path: Optional[str] = None,
          n_examples: Optional[int] = None, no_check: bool = False,
          cascade: bool = False, data_dir: Optional[str] = None, ab_reps: int = 3) -> None:
    """Time the training step against (k+1) forward+backward passes, and the eval attacks;
    with --run, the evaluation side on a trained run."""
    import json as _json

    import torch

    from benchmark.run.bench import bench as run_bench, format_bench, to_json
    from benchmark.config import parse_hparams

    if run_path:
        from benchmark.eval.bench_eval import bench_eval, format_bench_eval
        from benchmark.cores import use_all_cores
        use_all_cores(threads)
        rec = bench_eval(run_path, attacks="fgsm,pgd,autoattack" if attacks is None else
                         attacks or "fgsm,pgd", n_examples=n_examples, device=device,
                         check=not no_check, cascade=cascade, ab_reps=ab_reps,
                         data_dir=Path(data_dir) if data_dir else None)
        click.echo(format_bench_eval(rec))
        if json_path:
            Path(json_path).write_text(_json.dumps(rec, indent=1, default=str) + "\n")
        return
    if threads:
        torch.set_num_threads(threads)
    result = run_bench(defense, arch, dataset=dataset, profile=profile, batch_size=batch_size,
                       device=device, steps=steps, warmup=warmup, reps=reps, amp=amp,
                       channels_last=channels_last, compile=compile_,
                       attacks="fgsm,pgd" if attacks is None else attacks or None,
                       eval_samples=eval_samples, hparams=parse_hparams(hparams))
    click.echo(format_bench(result))
    if json_path:
        Path(json_path).write_text(to_json(result) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point: every error is one line on stderr and an exit status.

    2: bad input (options, hyperparameters, data, checkpoints) and OSErrors (full disk, ...);
    3: NaN/inf in training or in a model; 130/143: Ctrl-C / SIGTERM (rerun to resume);
    1: an unexpected error, as a one-line summary (the traceback with ``--debug``).
    """
    import signal
    import sys

    args = list(argv) if argv is not None else sys.argv[1:]
    debug = "--debug" in args

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    code: Any = 0
    try:
        code = cli.main(args=args, prog_name="advbench", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("advbench: interrupted", err=True)
        code = 130
    except click.ClickException as exc:  # an option value or usage error found by click
        click.echo(f"advbench: error: {_one_line(exc.format_message())}", err=True)
        code = 2
    except AdvbenchError as exc:
        click.echo(f"advbench: error: {_one_line(exc)}", err=True)
        code = exc.exit_code
    except OSError as exc:
        click.echo(f"advbench: error: {_one_line(exc)}", err=True)
        code = 2
    except KeyboardInterrupt:
        click.echo("advbench: interrupted", err=True)
        code = 130
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if debug:
            import traceback
            traceback.print_exc()
        click.echo(f"advbench: internal error: {type(exc).__name__}: {_one_line(exc)[:300]} "
                   f"(rerun with --debug for the traceback)", err=True)
        code = 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # python -m benchmark.cli
    main()
