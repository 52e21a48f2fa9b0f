"""submitit_launch.py and util/slurm.py (issue #5): local-executor jobs, preemption + requeue, sweeps, dry runs.

The jobs run through submitit's LocalExecutor: a controller process that starts the task, restarts it when it
exits with submitit's requeue code, and installs submitit's real signal handlers in it. (LocalJob._interrupt()
cannot simulate preemption in submitit 1.5.4: it signals the controller, which dies. So the preemption signal
is sent by the task to itself at a chosen step, the way SLURM's would arrive mid-step.)
"""
import dataclasses
import glob
import json
import os
import shutil
import signal
import sys

import cloudpickle
import huggingface_hub
import pytest
from tiny import assert_same_weights, pretrain_argv

import submitit_launch as launch
from util import checkpoint, slurm
from util.signals import DEFAULT_POLICY, StopSignals

# the preempting job class below must travel by value: the job process cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def job_environment():
    """Every job of this module with the same thread count (so their floating point sums agree), and
    PYTHONPATH restored after submit() extended it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # jobs also run side by side on a small CPU budget
        mp.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        yield


def train_argv(data, teacher, *extra):
    """test_pretrain's tiny run (2 epochs x 6 steps) without --output_dir: the launcher sets it."""
    argv = pretrain_argv(data, "unused", teacher, "--save_interval_min", "60", "--drop_path", "0.1", *extra)
    i = argv.index("--output_dir")
    return argv[:i] + argv[i + 2:]


def local_launch(job_dir, *flags):
    return ["pretrain", "--local", "--ngpus", "0", "--timeout", "20", "--job_dir", str(job_dir), *flags]


def with_val(data_dir, tmp_path):
    """The shared tiny data (train/ only) plus a val/ copy: what fine-tuning needs."""
    data = tmp_path / "labelled"
    shutil.copytree(os.path.join(data_dir, "train"), data / "train")
    shutil.copytree(os.path.join(data_dir, "train"), data / "val")
    return str(data)


def latest(out):
    return checkpoint.load(os.path.join(out, checkpoint.LATEST))


def job_logs(job_dir):
    return "".join(open(p).read() for p in glob.glob(os.path.join(job_dir, "**", "*_log.*"), recursive=True))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, teacher_file):
    """A whole local job, output dir defaulting to the job dir up to %j."""
    root = tmp_path_factory.mktemp("uninterrupted")
    code = launch.run(local_launch(root / "%j", "--", *train_argv(data_dir, teacher_file)))
    outs = glob.glob(str(root / "**" / checkpoint.LATEST), recursive=True)
    return code, root, [os.path.dirname(p) for p in outs]


def test_local_job_completes_and_writes_its_checkpoint(uninterrupted):
    code, root, outs = uninterrupted
    assert code == 0
    assert outs == [str(root)]  # <job_dir> up to %j; the job's own folder holds only submitit's files
    state = latest(outs[0])
    assert (state["resume_epoch"], state["resume_step"]) == (2, 0)
    assert state["args"]["output_dir"] == outs[0]
    assert "Job completed successfully" in job_logs(root)
    job_folders = [n for n in os.listdir(root) if os.path.isdir(root / n)]
    assert len(job_folders) == 1 and job_folders[0].isdigit()  # and no folder literally named %j


def test_resubmitting_the_same_command_resumes_from_the_last_checkpoint(tmp_path, data_dir, teacher_file, capsys):
    """Issue 11, item 13: the README's `--job_dir .../%j` gave every submission a new output folder (two
    runs, both from step 0); now the second submission continues the first one's run."""
    def submit(epochs):
        code = launch.run(local_launch(tmp_path / "%j", "--", *train_argv(data_dir, teacher_file, "--epochs", epochs)))
        return code, capsys.readouterr().out

    code, first = submit("1")
    assert code == 0 and f"output {tmp_path}," in first and "resumes from" not in first
    assert "progress log " in first and first.strip().splitlines()[0].endswith("_0_log.err")
    code, second = submit("2")
    assert code == 0 and f"output {tmp_path} (resumes from checkpoint-latest.pth)" in second
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "log.txt")] == [0, 1]
    assert latest(tmp_path)["resume_epoch"] == 2
    second_log = second.split("progress log ")[1].split()[0]
    assert "resumed from" in open(second_log).read() and "training epochs 1..1" in open(second_log).read()
    assert not any("%" in name for name in os.listdir(tmp_path))


@dataclasses.dataclass
class PreemptedOnce(slurm.TrainingJob):
    """The first time it runs, rank 0 receives submitit's preemption signal in the middle of its micro-step
    PREEMPT_AT; the requeued copy (checkpoint() keeps the class) runs undisturbed."""

    def __call__(self):
        marker = os.environ["PREEMPT_MARKER"]
        if slurm.submitit.JobEnvironment().global_rank == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            import main_pretrain
            original, calls, at = main_pretrain.pretrain_forward, {"n": 0}, int(os.environ["PREEMPT_AT"])

            def forward(model, batch):
                calls["n"] += 1
                if calls["n"] == at:
                    os.kill(os.getpid(), slurm.preempt_signal())
                return original(model, batch)

            main_pretrain.pretrain_forward = forward
        return super().__call__()


def run_preempted(tmp_path, monkeypatch, at, *argv):
    monkeypatch.setattr(launch, "TrainingJob", PreemptedOnce)
    monkeypatch.setenv("PREEMPT_MARKER", str(tmp_path / "preempted"))
    monkeypatch.setenv("PREEMPT_AT", str(at))
    code = launch.run([*argv, "--output_dir", str(tmp_path / "out")])
    logs = job_logs(tmp_path / "jobs")
    assert code == 0
    assert os.path.exists(tmp_path / "preempted")
    assert "this job is timed-out" in logs or "this job is preempted" in logs  # submitit's handler ran...
    assert "Requeued job" in logs  # ...after our checkpoint(), and the controller restarted the task(s)
    return str(tmp_path / "out"), logs


def test_preempted_job_is_requeued_and_ends_with_the_same_weights(uninterrupted, tmp_path, data_dir, teacher_file,
                                                                  monkeypatch):
    # 6 steps per epoch: micro-step 8 is epoch 1, step 1. With --save_interval_min 60 the only mid-epoch
    # checkpoint is the one the preemption signal makes the loop write.
    out, logs = run_preempted(tmp_path, monkeypatch, 8, *local_launch(tmp_path / "jobs" / "%j"), "--",
                              *train_argv(data_dir, teacher_file))
    assert "resumed from" in logs and "at epoch 1, step 2" in logs  # the exact iteration, not epoch 0
    assert latest(out)["resume_epoch"] == 2
    assert_same_weights(latest(uninterrupted[2][0])["model"], latest(out)["model"])


def test_two_rank_job_is_preempted_and_requeued_together(tmp_path, data_dir, teacher_file, monkeypatch):
    """Ranks and rendezvous come from submitit's JobEnvironment; only rank 0 gets the signal, the all-reduce
    stops rank 1 at the same step, rank 0 requeues and the controller restarts both."""
    argv = train_argv(data_dir, teacher_file, "--mask_ratio", "0.0", "--drop_path", "0")
    two = ["--tasks_per_node", "2"]
    assert launch.run(local_launch(tmp_path / "full", *two, "--", *argv)) == 0
    # 3 steps per epoch and rank: micro-step 5 is epoch 1, step 1
    out, logs = run_preempted(tmp_path, monkeypatch, 5, *local_launch(tmp_path / "jobs" / "%j", *two), "--", *argv)
    assert "global_rank=1(2)" in logs and "requeuing since I am a slave (procid=1)" in logs  # rank 1 left it to 0
    assert logs.count("stopped by signal at epoch 1, step 2") == 2  # both ranks, at the same step
    assert logs.count("at epoch 1, step 2\n") >= 1 and "resumed from" in logs
    assert_same_weights(latest(tmp_path / "full")["model"], latest(out)["model"])


def test_slurm_submission_with_fake_sbatch(tmp_path, data_dir, capsys, monkeypatch):
    """The real SlurmExecutor path up to sbatch: parameters accepted, one array for a sweep, summary by job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/script.sh\necho Submitted batch job 4242\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("mask_ratio: [0.6, 0.7]\ntop_k: [3, 5]\n")
    assert launch.run(["pretrain", "--nodes", "2", "--partition", "learnlab", "--sweep", str(sweep), "--nodes_online",
                       "--job_dir", str(tmp_path / "jobs" / "%j"), "--data_path", data_dir]) == 0
    script = (tmp_path / "script.sh").read_text()
    assert "#SBATCH --array=0-3%4" in script and "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert f"export PYTHONPATH={slurm.REPO}" in script
    rows = json.load(open(tmp_path / "jobs" / "4242" / "sweep.json"))
    assert [r["job_id"] for r in rows] == ["4242_0", "4242_1", "4242_2", "4242_3"]
    assert rows[3]["output_dir"] == str(tmp_path / "jobs" / "mask_ratio=0.7,top_k=5")  # found by a resubmission
    assert rows[3]["log"] == str(tmp_path / "jobs" / "4242" / "4242_3_0_log.err")  # where the progress goes
    assert rows[3]["overrides"] == {"mask_ratio": 0.7, "top_k": 5}
    assert "submitted pretrain job 4242_3 (mask_ratio=0.7,top_k=5)" in capsys.readouterr().out


def test_two_point_sweep_makes_two_runs_with_their_settings(tmp_path, data_dir, teacher_file):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"grid": {"mask_ratio": [0.5, 0.6], "top_k": 2}}))
    job_dir = tmp_path / "sweep" / "%j"
    code = launch.run(local_launch(job_dir, "--sweep", str(sweep), "--",
                                   *train_argv(data_dir, teacher_file, "--epochs", "1")))
    assert code == 0
    summaries = glob.glob(str(tmp_path / "sweep" / "*" / "sweep.json"))
    assert len(summaries) == 1
    rows = json.load(open(summaries[0]))
    assert [r["name"] for r in rows] == ["mask_ratio=0.5,top_k=2", "mask_ratio=0.6,top_k=2"]
    assert len({r["job_id"] for r in rows}) == 2
    for row, ratio in zip(rows, (0.5, 0.6)):
        assert os.path.basename(row["output_dir"]) == row["name"] and "%" not in row["output_dir"]
        args = latest(row["output_dir"])["args"]
        assert (args["mask_ratio"], args["top_k"], args["epochs"]) == (ratio, 2, 1)
    assert open(summaries[0].replace(".json", ".csv")).readline().strip() == "job_id,mask_ratio,top_k,output_dir"


def test_dry_run_prints_a_two_node_eight_gpu_job(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(launch, "submit", lambda *a: pytest.fail("dry run submitted"))
    code = launch.run(["pretrain", "--nodes", "2", "--ngpus", "8", "--timeout", "600", "--partition", "learnlab",
                       "--account", "vision", "--qos", "high", "--constraint", "volta32gb", "--comment", "ddl",
                       "--slurm", "exclude=node07", "--job_dir", str(tmp_path / "%j"), "--dry_run", "--nodes_online",
                       "--data_path", data_dir, "--batch_size", "128", "--device", "cuda"])  # no GPU here
    out = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --time=600", "#SBATCH --partition=learnlab", "#SBATCH --account=vision",
                 "#SBATCH --qos=high", "#SBATCH --constraint=volta32gb", "#SBATCH --comment=ddl",
                 "#SBATCH --exclude=node07", "#SBATCH --signal=USR2@120", "#SBATCH --cpus-per-task=10",
                 "#SBATCH --mem=320GB", "nodes=2", "gpus_per_node=8", "ntasks_per_node=8", "time=600"):
        assert line in out, line
    assert "16 process(es)" in out
    assert f"main_pretrain.py --data_path {data_dir} --batch_size 128 --device cuda --output_dir {tmp_path}\n" in out
    assert not os.listdir(tmp_path)


def test_sweep_dry_run_is_one_array(tmp_path, data_dir, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {mask_ratio: 0.6}\n- {mask_ratio: 0.7, align_cls: false}\n- {top_k: 3}\n")
    assert launch.run(["pretrain", "--dry_run", "--sweep", str(sweep), "--job_dir", str(tmp_path / "%j"),
                       "--array_parallelism", "2", "--nodes_online", "--data_path", data_dir]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2%2" in out and f"--output={tmp_path}/%A/%A_%a_0_log.out" in out
    assert f"--output_dir {tmp_path}/mask_ratio=0.7,align_cls=false" in out and "--no-align_cls" in out
    assert f"--output_dir {tmp_path}/top_k=3" in out


def test_without_slurm_it_says_what_to_do(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / srun
    monkeypatch.setattr(launch, "submit", lambda *a: pytest.fail("submitted without SLURM"))
    assert launch.run(["pretrain", "--job_dir", str(tmp_path / "%j"), "--data_path", data_dir, "--nodes_online"]) == 1
    err = capsys.readouterr().err
    assert "SLURM is not available" in err and "--local" in err and "--dry_run" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags,message", [
    (["--mask_ratio", "1.0"], "--mask_ratio"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--local", "--nodes", "2"], "--local runs on this machine only"),
])
def test_bad_flags_fail_before_submitting(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "submit", lambda *a: pytest.fail("submitted"))
    with pytest.raises(SystemExit) as exc:
        launch.run(["pretrain", "--job_dir", str(tmp_path / "%j"), "--device", "cpu", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_bad_sweep_point_fails_before_submitting(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "submit", lambda *a: pytest.fail("submitted"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  mask_ratio: [0.6, 1.5]\n")
    with pytest.raises(SystemExit) as exc:
        launch.run(["pretrain", "--sweep", str(sweep), "--job_dir", str(tmp_path / "%j"), "--device", "cpu"])
    assert exc.value.code == 2
    assert "(in sweep point mask_ratio=1.5)" in capsys.readouterr().err
    sweep.write_text("grid:\n  mask_ration: [0.6]\n")
    assert launch.run(["pretrain", "--sweep", str(sweep), "--device", "cpu"]) == 1
    assert "sweep key 'mask_ration' is not a flag" in capsys.readouterr().err


def test_sweep_files_grid_mapping_and_list(tmp_path):
    grid = {"mask_ratio": [0.6, 0.7], "top_k": [3, 5], "epochs": 100}
    (tmp_path / "a.json").write_text(json.dumps({"grid": grid}))
    (tmp_path / "b.yaml").write_text("mask_ratio: [0.6, 0.7]\ntop_k: [3, 5]\nepochs: 100\n")
    (tmp_path / "c.yml").write_text("- {mask_ratio: 0.6, model_kwargs: {depth: 6}}\n- {}\n")
    points = launch.load_sweep(str(tmp_path / "a.json"))
    assert points == launch.load_sweep(str(tmp_path / "b.yaml")) and len(points) == 4
    assert points[1] == {"mask_ratio": 0.6, "top_k": 5, "epochs": 100}
    assert [launch.point_name(p) for p in launch.load_sweep(str(tmp_path / "c.yml"))] == \
        ["mask_ratio=0.6,model_kwargs=depth=6", "base"]
    assert launch.point_name({"data_path": "/a b/c"}) == "data_path=_a_b_c"
    assert len(launch.point_name({"x": "y" * 500})) <= 200
    (tmp_path / "d.yaml").write_text("42\n")
    with pytest.raises(launch.LaunchError, match="expected a grid"):
        launch.load_sweep(str(tmp_path / "d.yaml"))


def test_overrides_become_the_tasks_flags():
    import main_pretrain
    parser = main_pretrain.get_args_parser()
    argv = launch.overrides_to_argv({"mask_ratio": 0.6, "align_cls": False, "pin_mem": False, "demo": True,
                                     "model_kwargs": {"depth": 6}, "teacher_kwargs": ["depth=3"]}, parser)
    assert argv == ["--mask_ratio", "0.6", "--no-align_cls", "--no_pin_mem", "--demo", "--model_kwargs", "depth=6",
                    "--teacher_kwargs", "depth=3"]
    assert launch.overrides_to_argv({"align_cls": True, "demo": False}, parser) == ["--align_cls"]
    with pytest.raises(launch.LaunchError, match="set by the launcher"):
        launch.overrides_to_argv({"output_dir": "x"}, parser)
    finetune = pytest.importorskip("main_finetune")
    assert launch.overrides_to_argv({"global_pool": False}, finetune.get_args_parser()) == ["--cls_token"]


def test_task_word_separator_and_interleaved_flags():
    args, rest = launch.parse_args(["linprobe", "--nodes", "2", "--blr", "0.1", "--ngpus", "4", "--local_flag_x"])
    assert (args.task, args.nodes, args.ngpus, args.tasks_per_node, rest) == \
        ("linprobe", 2, 4, 4, ["--blr", "0.1", "--local_flag_x"])
    args, rest = launch.parse_args(["--task", "finetune", "--", "--nodes", "3"])
    assert (args.task, args.nodes, rest) == ("finetune", 1, ["--nodes", "3"])
    assert launch.parse_args(["--ngpus", "0"])[0].tasks_per_node == 1


@pytest.mark.parametrize("task", list(slurm.TASKS))
def test_launcher_flags_do_not_shadow_training_flags(task):
    try:
        module = slurm.entry_point(task)
    except ValueError:
        pytest.skip(f"{slurm.TASKS[task].module}.py not in this checkout")
    ours = set(launch.get_args_parser()._option_string_actions) - {"-h", "--help"}
    assert not ours & set(module.get_args_parser()._option_string_actions)


def test_linprobe_runs_main_finetune_with_linprobe(tmp_path, data_dir, capsys):
    pytest.importorskip("main_finetune")
    data = with_val(data_dir, tmp_path)
    assert launch.run(["linprobe", "--dry_run", "--job_dir", str(tmp_path / "%j"), "--data_path", data,
                       "--device", "cpu"]) == 0
    assert "python main_finetune.py --linprobe --data_path" in capsys.readouterr().out


def test_torchrun_variables_from_the_slurm_job_environment(monkeypatch):
    from util.distributed import DistEnv, env_from_torchrun
    for key, value in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="16",
                           SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_PROCID="9", SLURM_LOCALID="1",
                           SLURM_JOB_NODELIST="gpu[007-008]").items():
        monkeypatch.setenv(key, value)
    env = slurm.torchrun_env(slurm.submitit.JobEnvironment())
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu007", "MASTER_PORT": str(slurm.master_port("4242"))}
    assert 20000 <= slurm.master_port("4242") < 40000 and slurm.master_port("4242_1") != slurm.master_port("4242_2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert env_from_torchrun() == DistEnv(rank=9, world_size=16, local_rank=1)  # what init_distributed reads


def test_job_tags_expand_like_slurm():
    assert slurm.expand_job_tags("/x/%j/%A-%a", "77_3") == "/x/77_3/77-3"
    assert slurm.expand_job_tags("/x/%j/%A", "77") == "/x/77/77"


def test_signal_policy_in_a_submitit_job():
    """Preemption stops the loop, SIGTERM only checkpoints; the defaults come back afterwards."""
    usr2 = signal.SIGUSR2
    policy = slurm.submitit_stop_policy(usr2)
    signals = StopSignals(policy).install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert (signals.pending_save, signals.pending_stop) == (True, False)
        signal.raise_signal(usr2)
        assert signals.pending_stop
    finally:
        signals.uninstall()
    assert policy.requeued_by_launcher and not DEFAULT_POLICY.requeued_by_launcher
    assert DEFAULT_POLICY.actions == {signal.SIGUSR1: "save", signal.SIGTERM: "stop"}
    assert signal.getsignal(usr2) == signal.SIG_DFL


def test_output_dir_is_the_job_dir_up_to_its_first_job_tag():
    assert launch.stable_output_dir("/ckpt/u/maskalign/ma_b16/%j") == "/ckpt/u/maskalign/ma_b16"
    assert launch.stable_output_dir("/ckpt/u/run_%A/%a/logs") == "/ckpt/u"
    assert launch.stable_output_dir("/ckpt/u/fixed") == "/ckpt/u/fixed"


def dry_run(tmp_path, task, *argv):
    return launch.run([task, "--dry_run", "--job_dir", str(tmp_path / "jobs" / "%j"), *argv])


def test_teacher_and_checkpoint_files_are_checked_before_submitting(tmp_path, data_dir, teacher_file, capsys,
                                                                    monkeypatch):
    """Issue 11, item 12: what used to die at start-up after waiting in the queue is refused at once."""
    monkeypatch.setattr(launch, "submit", lambda *a: pytest.fail("submitted"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    missing = str(tmp_path / "ViT-B-16.pt")
    for argv, message in [
        (["pretrain", "--data_path", data_dir, "--teacher_weights", missing],
         f"--teacher_weights {missing}: no such file"),
        # a hub tag and no --teacher_weights: the nodes are assumed offline and nothing is cached here
        (["pretrain", "--data_path", data_dir], "takes its weights from the Hugging Face hub (timm/vit_base"),
        (["finetune", "--data_path", with_val(data_dir, tmp_path), "--finetune", missing],
         f"--finetune {missing} does not exist"),
    ]:
        if argv[0] == "pretrain" and "--teacher_weights" not in argv:
            argv += ["--teacher", "timm:vit_base_patch16_clip_224.openai"]
        with pytest.raises(SystemExit) as exc:
            dry_run(tmp_path, *argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        if "hub" in message:
            assert "--teacher_weights PATH" in err and "--nodes_online" in err
    assert not (tmp_path / "jobs").exists()


def test_what_may_pass_the_checks(tmp_path, data_dir, teacher_file, capsys, monkeypatch):
    import maskalign.teacher_weights as teachers
    monkeypatch.setattr(launch, "submit", lambda *a: pytest.fail("submitted"))
    hub_teacher = ["--teacher", "timm:vit_base_patch16_clip_224.openai"]
    assert dry_run(tmp_path, "pretrain", "--data_path", data_dir, *hub_teacher, "--nodes_online") == 0
    assert dry_run(tmp_path, "pretrain", "--demo") == 0  # the demo writes its own teacher file
    monkeypatch.setattr(teachers, "cached_hub_file", lambda repo_id, filenames: "/hf/cache/model.safetensors")
    assert dry_run(tmp_path, "pretrain", "--data_path", data_dir, *hub_teacher) == 0
    assert "the Hugging Face cache's /hf/cache/model.safetensors; the compute nodes must see" in capsys.readouterr().out
    # a checkpoint that an earlier job writes: not there yet, and the job waits for that one
    ckpt = str(tmp_path / "pretrain" / "checkpoint-199.pth")
    assert dry_run(tmp_path, "finetune", "--after", "4242", "--data_path", with_val(data_dir, tmp_path),
                   "--finetune", ckpt, "--resume", ckpt + ".ft") == 0
    out = capsys.readouterr().out
    assert "#SBATCH --dependency=afterok:4242" in out and f"--finetune {ckpt}" in out
    with pytest.raises(SystemExit) as exc:
        launch.run(["finetune", "--local", "--after", "4242"])
    assert exc.value.code == 2


def test_jobs_get_the_offline_environment(tmp_path, data_dir, teacher_file, capsys, monkeypatch):
    """HF_HUB_OFFLINE (and the cache locations) go into the job script, not only into this shell."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", "/shared/hf home")
    argv = ["pretrain", "--data_path", data_dir, "--teacher", "timm:vit_tiny_patch16_224", "--teacher_weights",
            teacher_file]
    assert dry_run(tmp_path, *argv) == 0
    script = capsys.readouterr().out
    assert "export HF_HUB_OFFLINE=1\n" in script and "export HF_HOME='/shared/hf home'\n" in script
    assert dry_run(tmp_path, *argv, "--nodes_online") == 0
    script = capsys.readouterr().out
    assert "HF_HUB_OFFLINE" not in script and "export HF_HOME=" in script
