"""Launch pre-training, fine-tuning or linear probing on SLURM through submitit (or submitit's local executor).

    python submitit_launch.py pretrain --nodes 4 --ngpus 8 --partition learnlab --timeout 4320 \
        --job_dir /checkpoint/$USER/maskalign/ma_b16/%j -- --data_path /datasets/imagenet --batch_size 32 \
        --teacher openai/clip-vit-base-patch16 --teacher_weights /ckpt/clip/ViT-B-16.pt
    python submitit_launch.py pretrain --sweep sweep.yaml --nodes 2 ...     # one array job per sweep point
    python submitit_launch.py pretrain --dry_run ...                        # print the sbatch script, submit nothing

The task is the first word (`pretrain`, `finetune`, `linprobe`); launcher flags are MAE's plus a few (`--help`),
every other flag goes to the task's entry point and is validated by its parser before anything is submitted.
docs/slurm.md covers output folders, resubmission, sweep files, chained jobs and preemption.
"""
import argparse
import contextlib
import csv
import json
import os
import shlex
import shutil
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import submitit
import yaml

from util.args import flag_value, new_parser
from util.slurm import JOB_TAGS, REPO, TASKS, TrainingJob, entry_point, expand_job_tags

SWEEP_NAME_MAX = 200  # characters; file systems allow 255 bytes per path component


class LaunchError(Exception):
    """A problem the user can fix (missing SLURM, bad sweep file); printed without a traceback."""


@dataclass
class JobSpec:
    """One training run: its overrides (sweep point), directory name and full entry-point argv."""
    name: str
    overrides: dict[str, Any]
    argv: list[str]
    output_dir: str = field(default="")


# ------------------------------------------------------------------------------------------ command line
def get_args_parser() -> argparse.ArgumentParser:
    # no abbreviations (new_parser): a training flag must never be taken for an abbreviated launcher flag
    parser = new_parser("MaskAlign submitit launcher")
    parser.epilog = "Other flags go to the task's entry point (see its --help)."
    parser.add_argument("--task", choices=list(TASKS), default="pretrain",
                        help="what to run (also accepted as the first word)")
    g = parser.add_argument_group("resources (MAE's launcher flags)")
    g.add_argument("--ngpus", type=int, default=None,
                   help="GPUs per node, one process per GPU (default: 8 on SLURM, the visible GPUs with --local)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--tasks_per_node", type=int, default=None, help="processes per node (default: ngpus, or 1)")
    g.add_argument("--cpus_per_task", type=int, default=10)
    g.add_argument("--mem_gb", type=int, default=None, help="memory per node (default: 40 per GPU; 0: not set)")
    g.add_argument("--timeout", type=int, default=4320, help="time limit per job, in minutes")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--comment", default=None)
    g.add_argument("--constraint", default=None, help="e.g. volta32gb (MAE's --use_volta32)")
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch parameter, repeatable: --slurm exclude=node[01-02] --slurm exclusive")
    g.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="shell line run before the job, repeatable, e.g. 'module load cuda/12.1'")
    g = parser.add_argument_group("jobs")
    g.add_argument("--job_dir", default=os.path.join("output_dir", "%j"),
                   help="submitit files and logs, a folder per job with %%j (the job id). Unless given, the "
                        "training's --output_dir is the part before the first folder with %%j, %%A or %%a: the "
                        "same for every submission, so resubmitting resumes (default: %(default)s)")
    g.add_argument("--job_name", default=None, help="default: maskalign_<task>")
    g.add_argument("--signal_delay_s", type=int, default=120,
                   help="SLURM signals the job this long before its time limit, to checkpoint and requeue")
    g.add_argument("--max_num_timeout", type=int, default=30, help="requeues after a time-out before giving up "
                                                                   "(preemptions do not count)")
    g.add_argument("--after", default=None, metavar="JOB_ID",
                   help="start once SLURM job JOB_ID has succeeded (sbatch --dependency=afterok:JOB_ID); "
                        "--finetune / --resume may then name files that job writes: they are not checked")
    g.add_argument("--nodes_online", action="store_true",
                   help="the compute nodes can reach the Hugging Face hub. Without it the launcher assumes they "
                        "cannot: hub weights of the teacher must be in the Hugging Face cache here (shared with "
                        "the nodes) or a --teacher_weights file, and jobs run with HF_HUB_OFFLINE=1")
    g.add_argument("--sweep", default=None, metavar="FILE", help="YAML/JSON grid or list of overrides")
    g.add_argument("--array_parallelism", type=int, default=256, help="sweep jobs running at once")
    g = parser.add_argument_group("modes")
    g.add_argument("--local", action="store_true", help="run here through submitit's local executor and wait")
    g.add_argument("--dry_run", action="store_true", help="print the SLURM job and commands, submit nothing")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """(launcher flags, training argv): the leading task word, then launcher flags, the rest passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    task = argv.pop(0) if argv and argv[0] in TASKS else None
    parser = get_args_parser()
    if "--" in argv:  # an explicit separator: everything after it is training flags
        cut = argv.index("--")
        args = parser.parse_args(argv[:cut])
        train_argv = argv[cut + 1:]
    else:
        args, train_argv = parser.parse_known_args(argv)
    if task:
        args.task = task
    _check(parser, args)
    return args, train_argv


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.ngpus is None:
        args.ngpus = _visible_gpus() if args.local else 8
    if args.tasks_per_node is None:
        args.tasks_per_node = max(args.ngpus, 1)
    if args.mem_gb is None:
        args.mem_gb = 40 * args.ngpus
    if args.job_name is None:
        args.job_name = f"maskalign_{args.task}"
    checks = [(args.ngpus >= 0, "--ngpus must be >= 0"), (args.nodes >= 1, "--nodes must be >= 1"),
              (args.tasks_per_node >= 1, "--tasks_per_node must be >= 1"),
              (args.timeout >= 1, "--timeout must be >= 1"),
              (not (args.local and args.nodes > 1), "--local runs on this machine only: use --nodes 1"),
              (args.sweep is None or os.path.isfile(args.sweep), f"--sweep {args.sweep} does not exist"),
              (not (args.local and args.after), "--after is a SLURM dependency: run the jobs one after another "
                                                "with --local instead")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:
        args.slurm = parse_slurm_params(args.slurm)
    except ValueError as e:
        parser.error(str(e))
    args.job_dir = os.path.abspath(args.job_dir)  # jobs may start in another directory


def _visible_gpus() -> int:
    import torch
    return torch.cuda.device_count()


def parse_slurm_params(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` -> sbatch `--KEY=VALUE`; a bare `KEY` is a switch (e.g. `exclusive`, `requeue`)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"--slurm expects KEY=VALUE, got {item!r}")
        params[key] = value if sep else True
    return params


# ---------------------------------------------------------------------------------------------- sweeps
def load_sweep(path: str) -> list[dict[str, Any]]:
    """The points of a sweep file, in order; each point is {flag name: value}."""
    with open(path) as f:
        try:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise LaunchError(f"--sweep {path}: cannot parse it: {e}") from None
    if isinstance(data, dict) and set(data) == {"grid"}:
        data = data["grid"]
    if isinstance(data, dict) and data:
        points = grid_points(data)
    elif isinstance(data, list) and data and all(isinstance(p, dict) for p in data):
        points = [dict(p) for p in data]
    else:
        raise LaunchError(f"--sweep {path}: expected a grid (a mapping of flag: [values], optionally under "
                          f"'grid:') or a non-empty list of mappings of flag: value")
    return [{k.lstrip("-"): v for k, v in p.items()} for p in points]


def grid_points(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product; a scalar is a single value (a fixed override)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise LaunchError(f"sweep grid: {key} has no values")
        points = [{**p, key: v} for p in points for v in values]
    return points


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return "+".join(f"{k}={_format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "-".join(_format_value(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def point_name(overrides: dict[str, Any]) -> str:
    """`mask_ratio=0.6,top_k=3`: readable, and safe as one path component on any file system."""
    if not overrides:
        return "base"
    raw = ",".join(f"{k}={_format_value(v)}" for k, v in overrides.items())
    safe = "".join(c if c.isalnum() or c in "._,=+-" else "_" for c in raw)
    if len(safe) > SWEEP_NAME_MAX:  # keep it unique: a hash of the full name replaces the tail
        safe = f"{safe[:SWEEP_NAME_MAX - 9]}-{zlib.crc32(raw.encode()):08x}"
    return safe


def overrides_to_argv(overrides: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """{flag: value} -> command-line words that the task's parser understands."""
    actions = parser._option_string_actions  # argparse keeps no public map from flag to action
    argv: list[str] = []
    for key, value in overrides.items():
        flag = f"--{key}"
        if flag not in actions:
            raise LaunchError(f"sweep key {key!r} is not a flag of this task (see its --help)")
        if key in ("output_dir", "log_dir"):
            raise LaunchError(f"sweep key {key!r}: each point's directories are set by the launcher")
        argv += _flag_words(flag, value, actions)
    return argv


def _flag_words(flag: str, value: Any, actions: dict[str, argparse.Action]) -> list[str]:
    action = actions[flag]
    if isinstance(value, bool) and action.nargs == 0:
        return _switch_words(flag, value, action, actions)
    if isinstance(value, dict):
        return [flag, *(f"{k}={v}" for k, v in value.items())]
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def _switch_words(flag: str, value: bool, action: argparse.Action, actions: dict[str, argparse.Action]) -> list[str]:
    """`switch: true` passes it; `false` passes its opposite (`--no-x`, `--no_x`, or another flag with the same
    destination such as `--cls_token` for `--global_pool`), or nothing when it has none."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else f"--no-{flag[2:]}"]
    if value:
        return [flag]
    for option, other in actions.items():
        if other is not action and other.dest == action.dest and other.nargs == 0:
            return [option]
    return []


# ------------------------------------------------------------------------------------- job specification
@contextlib.contextmanager
def cuda_assumed(assume: bool) -> Iterator[None]:
    """Validate GPU flags (--device cuda, --amp fp16) on a login node without GPUs, for jobs that get them."""
    if not assume:
        yield
        return
    import torch
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        yield


@contextlib.contextmanager
def files_assumed(paths: set[str]) -> Iterator[None]:
    """Validate flags that name files an earlier job (--after) has yet to write."""
    if not paths:
        yield
        return
    isfile = os.path.isfile
    with mock.patch("os.path.isfile", lambda path: path in paths or isfile(path)):
        yield


def build_specs(args: argparse.Namespace, train_argv: list[str]) -> list[JobSpec]:
    """One spec per job, each validated by the task's own parser (exit code 2 before anything is submitted)."""
    try:
        module = entry_point(args.task)
    except ValueError as e:  # e.g. main_finetune.py missing from this checkout
        raise LaunchError(str(e)) from None
    task_argv = [*TASKS[args.task].extra_argv, *train_argv]
    points = load_sweep(args.sweep) if args.sweep else [{}]
    base_dir = _user_output_dir(module, task_argv) or stable_output_dir(args.job_dir)
    parser = module.get_args_parser()
    specs = []
    for overrides in points:
        name = point_name(overrides)
        out = os.path.join(base_dir, name) if args.sweep else base_dir
        argv = [*task_argv, *overrides_to_argv(overrides, parser), "--output_dir", out]
        specs.append(JobSpec(name, overrides, argv, out))
    _check_unique(specs)
    assume_cuda = args.ngpus > 0 and not args.local
    parsed = [_validate(module, spec, assume_cuda, _pending_files(spec.argv) if args.after else set(),
                        point=spec.name if args.sweep else None) for spec in specs]
    if not (args.local or args.nodes_online):
        teachers = {(a.teacher, a.teacher_weights, a.demo): a for a in parsed if hasattr(a, "teacher")}
        for train_args in teachers.values():  # once per distinct teacher of a sweep
            _check_teacher_offline(train_args)
    return specs


def stable_output_dir(job_dir: str) -> str:
    """`job_dir` up to its first folder that holds a job tag (%j, %A, %a): the same for every submission of
    a command, so the resubmitted run finds the checkpoints of the last one."""
    parts = Path(job_dir).parts
    for i, part in enumerate(parts):
        if any(tag in part for tag in JOB_TAGS):
            return str(Path(*parts[:i]))
    return job_dir


def _pending_files(argv: list[str]) -> set[str]:
    """Checkpoints an earlier job (--after) will write: the entry point must not require them yet."""
    return {path for path in (flag_value(argv, "--finetune"), flag_value(argv, "--resume")) if path}


def _check_teacher_offline(train_args: argparse.Namespace) -> None:
    """Compute nodes without internet (the default assumption) can only use hub weights that are cached."""
    from maskalign.teacher_weights import cached_hub_file, hub_source, resolve_teacher_spec
    from util.recipes import DEMO_TEACHER

    if train_args.demo and train_args.teacher_weights is None and train_args.teacher == DEMO_TEACHER:
        return  # the demo writes its own local teacher file
    source = hub_source(resolve_teacher_spec(train_args.teacher, train_args.teacher_weights))
    if source is None:
        return
    cached = cached_hub_file(*source)
    if cached is None:
        get_args_parser().error(
            f"teacher {train_args.teacher} takes its weights from the Hugging Face hub ({source[0]}); they are "
            f"not in the Hugging Face cache here, and compute nodes are assumed to have no internet. Download "
            f"them and pass the file with --teacher_weights PATH, or add --nodes_online if the nodes can reach "
            f"the hub")
    print(f"teacher weights: the Hugging Face cache's {cached}; the compute nodes must see the same cache "
          f"(HF_HOME)")

def sweep_folder(args: argparse.Namespace) -> str:
    """submitit's folder: in a sweep %j becomes %A, so all array tasks share it (and the summary)."""
    return args.job_dir.replace("%j", "%A") if args.sweep else args.job_dir


def _user_output_dir(module: Any, argv: list[str]) -> Optional[str]:
    """--output_dir as the task's parser reads it (abbreviations included), None when not given."""
    parser = module.get_args_parser()
    parser.set_defaults(output_dir=None)
    known, _ = parser.parse_known_args(argv)
    return os.path.abspath(known.output_dir) if known.output_dir else None


def _check_unique(specs: list[JobSpec]) -> None:
    seen: dict[str, dict] = {}
    for spec in specs:
        if spec.output_dir in seen:
            raise LaunchError(f"sweep points {seen[spec.output_dir]} and {spec.overrides} would share the output "
                              f"directory {spec.output_dir}; remove the duplicate")
        seen[spec.output_dir] = spec.overrides


def _validate(module: Any, spec: JobSpec, assume_cuda: bool, pending: set[str],
              point: Optional[str]) -> argparse.Namespace:
    try:
        with cuda_assumed(assume_cuda), files_assumed(pending):
            return module.parse_args(spec.argv)
    except SystemExit as e:
        if point and e.code:  # argparse named the flag; say which sweep point carried it
            print(f"(in sweep point {point})", file=sys.stderr)
        raise


# ---------------------------------------------------------------------------------------------- executors
def pythonpath_setup() -> str:
    """Jobs unpickle util.slurm.TrainingJob, so the repo must be importable wherever they start."""
    return f'export PYTHONPATH={shlex.quote(REPO)}"${{PYTHONPATH:+:$PYTHONPATH}}"'


# Exported in every SLURM job explicitly: clusters that start jobs with a clean environment (sbatch
# --export=NONE, or a login shell that resets it) would drop them, and an offline node would then retry the hub.
HUB_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
           "HUGGINGFACE_HUB_CACHE", "TORCH_HOME")


def hub_env_setup(args: argparse.Namespace) -> list[str]:
    """`export` lines for HUB_ENV as set here; HF_HUB_OFFLINE=1 unless the nodes are declared online."""
    env = {key: os.environ[key] for key in HUB_ENV if key in os.environ}
    if not args.nodes_online:
        env["HF_HUB_OFFLINE"] = "1"
    return [f"export {key}={shlex.quote(value)}" for key, value in env.items()]


def slurm_parameters(args: argparse.Namespace, num_jobs: int) -> dict[str, Any]:
    """SlurmExecutor parameters (sbatch names); unset options are left to the cluster's defaults."""
    params = dict(job_name=args.job_name, time=args.timeout, nodes=args.nodes, ntasks_per_node=args.tasks_per_node,
                  gpus_per_node=args.ngpus or None, cpus_per_task=args.cpus_per_task,
                  mem=f"{args.mem_gb}GB" if args.mem_gb else None, partition=args.partition, account=args.account,
                  qos=args.qos, comment=args.comment, constraint=args.constraint,
                  signal_delay_s=args.signal_delay_s,
                  setup=[pythonpath_setup(), *hub_env_setup(args), *args.setup],
                  additional_parameters={**args.slurm, **({"dependency": f"afterok:{args.after}"} if args.after
                                                          else {})} or None,
                  array_parallelism=min(args.array_parallelism, num_jobs) if num_jobs > 1 else None)
    return {k: v for k, v in params.items() if v is not None}


def local_parameters(args: argparse.Namespace) -> dict[str, Any]:
    params = dict(timeout_min=args.timeout, gpus_per_node=args.ngpus, tasks_per_node=args.tasks_per_node,
                  signal_delay_s=args.signal_delay_s)
    return {**params, "setup": list(args.setup)} if args.setup else params


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def make_executor(args: argparse.Namespace, num_jobs: int) -> submitit.Executor:
    folder = sweep_folder(args)
    if args.local:
        executor = submitit.LocalExecutor(folder, max_num_timeout=args.max_num_timeout)
        executor.update_parameters(**local_parameters(args))
    else:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=args.max_num_timeout)
        executor.update_parameters(**slurm_parameters(args, num_jobs))
    return executor


def submit(args: argparse.Namespace, specs: list[JobSpec]) -> list[submitit.Job]:
    executor = make_executor(args, len(specs))
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO, path]) if path else REPO  # for local jobs
    # clean_env: a launch from inside a SLURM job or torchrun must not leak its ranks/ids into the new jobs
    with submitit.helpers.clean_env():
        jobs = executor.submit_array([TrainingJob(args.task, spec.argv) for spec in specs])
    remove_unexpanded_folder(folder=sweep_folder(args))
    return jobs


def remove_unexpanded_folder(folder: str) -> None:
    """submitit creates its folder argument as given, `%j` and all; the jobs use the expanded names."""
    if any(tag in folder for tag in JOB_TAGS) and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


# ------------------------------------------------------------------------------------------------ output
def training_command(task: str, argv: list[str]) -> str:
    return shlex.join(["python", f"{TASKS[task].module}.py", *argv])


def sbatch_script(args: argparse.Namespace, num_jobs: int) -> str:
    """The script submitit would write (its private builder, so the text matches what is submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = sweep_folder(args)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=num_jobs if num_jobs > 1 else None,
                               **slurm_parameters(args, num_jobs))


def print_dry_run(args: argparse.Namespace, specs: list[JobSpec]) -> None:
    where = "submitit's local executor" if args.local else "SLURM"
    print(f"# dry run: {len(specs)} {args.task} job(s) on {where}, nothing submitted")
    params = local_parameters(args) if args.local else slurm_parameters(args, len(specs))
    print("# parameters")
    for key, value in params.items():
        print(f"{key}={value}")
    if not args.local:
        print("# sbatch script")
        print(sbatch_script(args, len(specs)))
    tasks = args.nodes * args.tasks_per_node
    print(f"# training command(s): each runs as {tasks} process(es) ({args.nodes} node(s) x {args.tasks_per_node}), "
          f"ranks and master address from the job environment")
    for spec in specs:
        print(training_command(args.task, spec.argv))


def write_summary(args: argparse.Namespace, specs: list[JobSpec], jobs: list[submitit.Job]) -> str:
    """sweep.json / sweep.csv in the sweep's folder: job id -> overrides, output dir, logs, command."""
    rows = [{"job_id": job.job_id, "name": spec.name, "overrides": spec.overrides,
             "output_dir": expand_job_tags(spec.output_dir, job.job_id), "log": str(job.paths.stderr),
             "command": training_command(args.task, spec.argv)} for spec, job in zip(specs, jobs)]
    folder = expand_job_tags(sweep_folder(args), jobs[0].job_id)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=2)
    keys = list(dict.fromkeys(k for spec in specs for k in spec.overrides))
    with open(os.path.join(folder, "sweep.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job_id", *keys, "output_dir"])
        for row in rows:
            writer.writerow([row["job_id"], *(_format_value(row["overrides"].get(k, "")) for k in keys),
                             row["output_dir"]])
    return os.path.join(folder, "sweep.json")


def wait_local(jobs: list[submitit.Job], specs: list[JobSpec]) -> int:
    """--local runs in the foreground: wait, report each job, Ctrl-C cancels them."""
    failed = 0
    try:
        for job, spec in zip(jobs, specs):
            try:
                job.results()  # every task's; raises the first task error
                print(f"job {job.job_id} ({spec.name}) done: {expand_job_tags(spec.output_dir, job.job_id)}")
            except Exception as e:  # submitit re-raises the job's own error; report it and go on
                failed += 1
                print(f"job {job.job_id} ({spec.name}) failed: {str(e)[-2000:]}\nlog: {job.paths.stderr}",
                      file=sys.stderr)
    except KeyboardInterrupt:
        for job in jobs:
            job.cancel(check=False)
        return 130
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace, train_argv: list[str]) -> int:
    specs = build_specs(args, train_argv)
    if args.dry_run:
        print_dry_run(args, specs)
        return 0
    if not args.local and not slurm_available():
        raise LaunchError("SLURM is not available here (no sbatch/srun on PATH). Submit from a SLURM login node, "
                          "use --local to run through submitit's local executor on this machine, or --dry_run to "
                          "print the job without submitting.")
    jobs = submit(args, specs)
    for job, spec in zip(jobs, specs):
        out = expand_job_tags(spec.output_dir, job.job_id)
        print(f"submitted {args.task} job {job.job_id}{f' ({spec.name})' if args.sweep else ''}: output {out}"
              f"{_resume_note(out)}, progress log {job.paths.stderr}")
    if args.sweep:
        print(f"sweep summary: {write_summary(args, specs, jobs)}")
    if not args.local:
        return 0
    code = wait_local(jobs, specs)
    remove_unexpanded_folder(sweep_folder(args))
    return code


def _resume_note(output_dir: str) -> str:
    from util.checkpoint import find_resume

    resume = find_resume(output_dir)
    return f" (resumes from {os.path.basename(resume)})" if resume else ""


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 submitted (or, with --local, all jobs done), 1 launch error or a failed local job,
    2 bad launcher or training flags."""
    args, train_argv = parse_args(argv)
    try:
        return main(args, train_argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
