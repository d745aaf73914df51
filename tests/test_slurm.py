"""`scifm submit` on a real Slurm (tests/helpers/slurm_cluster.py: slurmctld + two slurmd on this machine).

Only the first tests run without Slurm: rendering with --dry-run, and the one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_CORPUS_DOCS
from scifm.cli import main as scifm
from tests.helpers.slurm_cluster import SlurmCluster, Unavailable
from tests.helpers.run_metrics import losses

STEPS = 8  # the two-node runs: checkpoints at 4 and 8, pre-emption somewhere in between


def base_overrides(corpus_dir: Path) -> list[str]:
    return ["experiment=tiny", f"data.corpus_dir={corpus_dir}", f"data.corpus_max_docs_per_source={SMALL_CORPUS_DOCS}",
            "trainer.batch_size=4", "data.seq_len=128", "data.val_batches=1", "trainer.log_every=1"]


def two_node_overrides(corpus_dir: Path) -> list[str]:
    return [*base_overrides(corpus_dir), f"trainer.max_steps={STEPS}", "trainer.val_every=4",
            "trainer.ckpt_every=4", "parallel.dp_shard=2"]


def nasty_override(tmp_path: Path) -> str:
    """A Hydra-quoted value with ; $() backticks and both quotes; each would create a file if run."""
    return (f"model.name='tiny; touch {tmp_path}/semicolon $(touch {tmp_path}/subshell) "
            f"`touch {tmp_path}/backtick` \"dq\" \\'sq\\''")


def submit(run_dir: Path, *args: str) -> str:
    """scifm submit in this process; returns the training job id, from the jobs it recorded."""
    scifm(["submit", *args])
    return json.loads((run_dir / "slurm" / "jobs.json").read_text())[0]["job_id"]


# ---- without Slurm -------------------------------------------------------------------------------

def test_dry_run_renders_without_slurm_and_bash_reads_overrides_unchanged(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no scontrol
    run_dir = tmp_path / "run"
    typed = ["experiment=tiny", "parallel.dp_shard=2", nasty_override(tmp_path), f"hydra.run.dir={run_dir}"]
    cluster = ["cluster=gpu", "cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.time=00:20:00",
               "cluster.partition=p1", "cluster.account=acc", "cluster.signal_seconds=90",
               "cluster.container_image=nvcr.io/nvidia/pytorch:25.01-py3", "cluster.container_mounts=/lustre:/lustre",
               "cluster.setup=['module load cuda','source /opt/venv/bin/activate']"]
    scifm(["submit", "--dry-run", "--eval-after", "--eval-override", "eval.max_items=3", *cluster, *typed])
    out = capsys.readouterr().out
    script = (run_dir / "slurm" / "train.sbatch").read_text()
    assert script in out and (run_dir / "slurm" / "eval.sbatch").read_text() in out
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--time=00:20:00", "--partition=p1",
                 "--account=acc", "--signal=B:USR1@90", "--requeue", f"--output={run_dir}/slurm/train-%j.out"):
        assert f"#SBATCH {line}\n" in script, line
    assert "\nmodule load cuda\nsource /opt/venv/bin/activate\n" in script
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in script
    assert "--container-mounts=/lustre:/lustre" in script
    assert "export NCCL_DEBUG=WARN" in script
    # bash itself reads the point's overrides back exactly as typed, and runs none of them
    case = script[script.index('case "${SLURM_ARRAY_TASK_ID'):script.index("esac") + 4]
    probe = f"{case}\nprintf '%s\\0' \"$RUN_DIR\" \"${{OVERRIDES[@]}}\""
    got = subprocess.run(["/bin/bash", "-c", probe], capture_output=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout.decode().split("\0")[:-1]
    assert got == [str(run_dir), *cluster, *typed]
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("semicolon", "subshell", "backtick")]
    assert subprocess.run(["/bin/bash", "-n", str(run_dir / "slurm" / "train.sbatch")]).returncode == 0


def test_the_readmes_sbatch_args_example_works_as_typed(tmp_path, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    [example] = re.findall(r"`'(cluster\.sbatch_args=\[.*?\])'`", readme)
    scifm(["submit", "--dry-run", "experiment=tiny", example, f"hydra.run.dir={tmp_path / 'run'}"])
    assert "#SBATCH --qos=high\n" in capsys.readouterr().out


def test_the_readmes_apptainer_example_works_as_typed(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    [example] = re.findall(r"\"(cluster\.python='apptainer .*?')\"", readme)
    run_dir = tmp_path / "run"
    scifm(["submit", "--dry-run", "experiment=tiny", "cluster=gpu", "cluster.gpus_per_node=1", example,
           f"hydra.run.dir={run_dir}"])
    srun = "srun --cpus-per-task=8 apptainer exec --nv /images/scifm.sif python -m scifm.launch.train_task "
    assert srun in (run_dir / "slurm" / "train.sbatch").read_text()


def test_dry_run_of_a_sweep_renders_a_job_array_and_one_eval_task_per_checkpoint(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    scifm(["submit", "--dry-run", "--eval-after", "-m", "experiment=tiny", "trainer.max_steps=4",
           "trainer.ckpt_every=2", "trainer.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"])
    train, evals = (sweep / "slurm" / "train.sbatch").read_text(), (sweep / "slurm" / "eval.sbatch").read_text()
    assert "#SBATCH --array=0-1\n" in train and f"#SBATCH --output={sweep}/slurm/train-%A_%a.out\n" in train
    for i, lr in enumerate(("0.001", "0.002")):
        typed = f"experiment=tiny trainer.max_steps=4 trainer.ckpt_every=2 trainer.lr={lr} hydra.sweep.dir={sweep}"
        assert f"RUN_DIR={sweep}/{i}\n    OVERRIDES=({typed})\n" in train
    assert "#SBATCH --array=0-3\n" in evals
    tasks = re.findall(r"^  (\d)\) TASK=\((\S+) (\d) (\d)\) ;;$", evals, re.M)
    assert tasks == [("0", f"{sweep}/0", "0", "2"), ("1", f"{sweep}/0", "1", "2"),
                     ("2", f"{sweep}/1", "0", "2"), ("3", f"{sweep}/1", "1", "2")]


def sbatch_options(script: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)$", script, re.M)


def test_the_eval_array_has_its_own_resources_not_the_training_jobs(tmp_path, capsys):
    """The issue's example: training takes whole 8-GPU nodes for a day; each eval task one GPU for 2 h."""
    run_dir = tmp_path / "run"
    scifm(["submit", "--dry-run", "--eval-after", "experiment=tiny", "cluster=gpu", "cluster.nodes=2",
           "cluster.gpus_per_node=8", "parallel.dp_shard=16", f"hydra.run.dir={run_dir}"])
    train, evals = ((run_dir / "slurm" / f"{kind}.sbatch").read_text() for kind in ("train", "eval"))
    assert {"--exclusive", "--mem=0", "--time=24:00:00", "--gpus-per-node=8"} <= set(sbatch_options(train))
    assert sbatch_options(evals)[1:] == ["--nodes=1", "--ntasks=1", "--cpus-per-task=8", "--time=02:00:00",
                                         f"--output={run_dir}/slurm/eval-%A_%a.out", "--array=0-3",
                                         "--partition=gpu", "--gpus-per-node=1"]
    assert "--kill-on-invalid-dep=yes" in capsys.readouterr().out


def test_eval_keys_throttles_and_a_wrapper_command_for_python(tmp_path):
    sweep = tmp_path / "sweep"
    scifm(["submit", "--dry-run", "--eval-after", "-m", "experiment=tiny", "trainer.lr=1e-3,2e-3,3e-3",
           "cluster=gpu", "cluster.gpus_per_node=1", "cluster.array_parallelism=2", "cluster.eval.parallelism=1",
           "cluster.eval.gpus=0", "cluster.eval.cpus_per_task=4", "cluster.eval.time=00:30:00",
           "cluster.eval.mem=32G", "cluster.eval.partition=cpu", 'cluster.eval.sbatch_args=["--qos=eval"]',
           'cluster.sbatch_args=["--qos=high"]', "cluster.python='apptainer exec --nv \"/images/an image.sif\" python'",
           f"hydra.sweep.dir={sweep}"])
    train, evals = ((sweep / "slurm" / f"{kind}.sbatch").read_text() for kind in ("train", "eval"))
    assert sbatch_options(train)[-5:] == ["--array=0-2%2", "--partition=gpu", "--mem=0", "--gpus-per-node=1",
                                          "--qos=high"]
    assert sbatch_options(evals)[1:] == ["--nodes=1", "--ntasks=1", "--cpus-per-task=4", "--time=00:30:00",
                                         f"--output={sweep}/slurm/eval-%A_%a.out", "--array=0-11%1",
                                         "--partition=cpu", "--mem=32G", "--qos=eval"]
    assert "export OMP_NUM_THREADS=4\n" in evals and "srun --cpus-per-task=4 apptainer" in evals
    # the interpreter is a command: bash reads back its words, the one with a space in one piece
    wrapped = "apptainer exec --nv '/images/an image.sif' python -m scifm.launch."
    for script, entry in ((train, "train_task"), (evals, "eval_task")):
        assert wrapped + entry in script
    got = subprocess.run(["/bin/bash", "-c", f"printf '%s\\0' {wrapped}"], capture_output=True, check=True)
    assert got.stdout.decode().split("\0")[:-1] == ["apptainer", "exec", "--nv", "/images/an image.sif",
                                                     "python", "-m", "scifm.launch."]


@pytest.mark.parametrize("args, message", [
    (["experiment=tiny"], "sbatch not found on PATH"),
    (["--dry-run", "experiment=tiny", "cluster=nowhere"], "cluster=nowhere: unknown cluster; available: gpu, local"),
    (["--dry-run", "experiment=tiny", "cluster.nodes=2"], "cluster: nodes=2 x 1 CPU task per node = 2 processes, "
                                                          "but the parallel layout"),
    (["--dry-run", "experiment=tiny", "cluster=gpu", "parallel.tp=8"], "parallel.tp: n_heads="),
    (["--dry-run", "experiment=tiny", "cluster.python='python \"img'"], "cluster.python: 'python \"img': No closing"),
    (["--dry-run", "experiment=tiny", "cluster.python=''"], "cluster.python: give the command that runs python"),
    (["--dry-run", "experiment=tiny", "cluster.eval.gpus=2"], "cluster.eval.gpus: the eval runs in one process"),
    (["--dry-run", "experiment=tiny", "cluster.eval.parallelism=-1"], "cluster.eval.parallelism: must be >= 0"),
])
def test_bad_input_is_one_error_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_:
        scifm(["submit", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"scifm: error: {message}") and err.count("\n") == 1, err


# ---- on a local Slurm ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as why:
        cluster.stop()
        pytest.skip(f"no local Slurm: {why}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]  # for sbatch called by scifm submit in-process
    yield cluster
    cluster.stop()
    if saved is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory) -> dict[int, float]:
    """The two-node runs' per-step losses from the same layout under a local torchrun."""
    run_dir = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scifm.train",
           *two_node_overrides(corpus_dir), f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(run_dir)


def job_cluster(nodes: int, python: str = sys.executable) -> list[str]:
    return ["cluster=local", f"cluster.nodes={nodes}", "cluster.time=00:10:00", f"cluster.python='{python}'"]


def container_stand_in(tmp_path: Path) -> str:
    """A command in the shape of `apptainer exec --nv IMAGE python`: the wrapper prints its two
    arguments to the job's log, then runs the rest."""
    wrapper = tmp_path / "wrap"
    wrapper.write_text('#!/bin/sh\necho "wrapper: $1|$2"\nshift 2\nexec "$@"\n')
    wrapper.chmod(0o755)
    return f'{wrapper} --nv "an image.sif" {sys.executable}'


def jobs_table(capsys, run_dir: Path) -> dict[str, list[str]]:
    """`scifm jobs` rows by job name: kind, state, elapsed, restarts, nodes/reason, log."""
    capsys.readouterr()
    scifm(["jobs", str(run_dir)])
    lines = capsys.readouterr().out.splitlines()[1:]
    return {row[0]: [*row[1:5], " ".join(row[5:-1]), row[-1]] for row in map(str.split, lines)}


def wait_for_first_step(slurm: SlurmCluster, job: str, run_dir: Path) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline and slurm.job(job)[0]["JobState"] in ("PENDING", "RUNNING"), \
            slurm.job(job)
        time.sleep(0.1)


def log_of(run_dir: Path, job_id: str) -> str:
    return (run_dir / "slurm" / f"train-{job_id}.out").read_text()


def preempted_once(slurm: SlurmCluster, run_dir: Path, *overrides: str) -> tuple[str, str]:
    """A two-node job sent USR1 after its first step, run to its end: (job id, its log); it must
    have completed after exactly one requeue."""
    job = submit(run_dir, *job_cluster(2), *overrides, f"hydra.run.dir={run_dir}")
    wait_for_first_step(slurm, job, run_dir)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    slurm.wait_gone(job)
    log = log_of(run_dir, job)
    [info] = slurm.job(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    return job, log


@pytest.mark.slurm
def test_two_node_job_equals_local_torchrun_and_gets_overrides_verbatim(slurm, reference, corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    nasty = nasty_override(tmp_path)
    job = submit(run_dir, *job_cluster(2), *two_node_overrides(corpus_dir), nasty, f"hydra.run.dir={run_dir}")
    slurm.wait_gone(job)
    [info] = slurm.job(job)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", (info, log_of(run_dir, job))
    assert losses(run_dir) == reference
    assert nasty in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    name = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"]
    t = tmp_path
    assert name == f"tiny; touch {t}/semicolon $(touch {t}/subshell) `touch {t}/backtick` \"dq\" 'sq'"
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("semicolon", "subshell", "backtick")]


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_losses(slurm, reference, corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    job, log = preempted_once(slurm, run_dir, *two_node_overrides(corpus_dir))
    stopped = int(re.search(r"pre-empted by SIGUSR1: checkpoint of step (\d+) written", log).group(1))
    assert 1 <= stopped < STEPS and f"requeueing job {job} (restart 1 of at most 3)" in log
    assert "SLURM_RESTART_COUNT=1; resuming from" in log and f"resumed from {run_dir}/checkpoints/step_{stopped}" in log
    assert losses(run_dir) == reference  # metrics.jsonl holds the steps of both runs
    capsys.readouterr()
    scifm(["jobs", str(run_dir)])
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == [job, "train", "COMPLETED"] and row[4] == "1"


@pytest.mark.slurm
def test_a_deepspeed_job_is_preempted_requeued_and_resumed_like_a_native_one(slurm, reference, corpus_dir, tmp_path):
    """parallel.engine=deepspeed through scifm submit on two nodes, pre-empted once: its losses are
    the native torchrun run's (to 1e-5 relative, the engines' tolerance in tests/test_deepspeed.py)."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    _, log = preempted_once(slurm, run_dir, *two_node_overrides(corpus_dir), "parallel.engine=deepspeed")
    assert "resumed from" in log
    got = losses(run_dir)
    assert sorted(got) == sorted(reference)
    for step, loss in got.items():
        assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step]), (step, got, reference)


@pytest.mark.slurm
def test_no_requeue_past_the_restart_limit_nor_after_scancel(slurm, corpus_dir, tmp_path):
    """Two one-node jobs side by side: USR1 with cluster.max_restarts=0, and a plain scancel (SIGTERM)."""
    runs = {"limit": tmp_path / "limit", "scancel": tmp_path / "scancel"}
    jobs = {case: submit(run_dir, *job_cluster(1), "cluster.max_restarts=0", *base_overrides(corpus_dir),
                         "trainer.max_steps=200", "trainer.ckpt_every=0", f"hydra.run.dir={run_dir}")
            for case, run_dir in runs.items()}  # 200 steps: both are still training when they are signalled
    for case, signal in (("limit", ["--signal=USR1", "--batch"]), ("scancel", [])):
        wait_for_first_step(slurm, jobs[case], runs[case])
        slurm.run("scancel", *signal, jobs[case])
    for case, job in jobs.items():
        slurm.wait_gone(job)
        [info], log = slurm.job(job), log_of(runs[case], job)
        state = {"limit": "FAILED", "scancel": "CANCELLED"}[case]
        assert info["JobState"] == state and info["Restarts"] == "0", (case, info, log)
        assert re.search(r"pre-empted by SIG(USR1|TERM): checkpoint of step \d+ written", log), log
        assert (runs[case] / "checkpoints").is_dir() and "SLURM_RESTART_COUNT=1" not in log
    assert "pre-empted after 0 restarts; cluster.max_restarts=0 reached, not requeueing" in log_of(runs["limit"],
                                                                                                   jobs["limit"])
    assert "SIGTERM: checkpoint written; not requeueing" in log_of(runs["scancel"], jobs["scancel"])


@pytest.mark.slurm
def test_eval_after_reports_every_checkpoint_with_python_wrapped_in_a_command(slurm, corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    job = submit(run_dir, "--eval-after", "--eval-override", "eval.max_items=4",
                 *job_cluster(1, container_stand_in(tmp_path)), *base_overrides(corpus_dir), "trainer.max_steps=4",
                 "trainer.val_every=2", "trainer.ckpt_every=2", f"hydra.run.dir={run_dir}")
    eval_job = json.loads((run_dir / "slurm" / "jobs.json").read_text())[1]["job_id"]
    # the pending array's log is a pattern, not a file named after Slurm's placeholder task id
    pending = jobs_table(capsys, run_dir)[f"{eval_job}_0-1"]
    assert pending[:2] == ["eval", "PENDING"] and pending[-1] == f"{run_dir}/slurm/eval-{eval_job}_%a.out", pending
    slurm.wait_gone(eval_job)
    tasks = slurm.job(eval_job)
    logs = {p.name: p.read_text()[-2000:] for p in (run_dir / "slurm").glob("*.out")}
    assert sorted(t["JobState"] for t in tasks) == ["COMPLETED", "COMPLETED"], (tasks, logs)
    for step in (2, 4):
        assert (run_dir / "eval" / f"step_{step}" / "results.json").is_file(), logs
        assert (run_dir / "eval" / f"step_{step}" / "report.md").is_file(), logs
    # every python ran inside the wrapper, which got the image path as one word
    wrapped = [p.name for p in (run_dir / "slurm").glob("*.out") if "wrapper: --nv|an image.sif\n" in p.read_text()]
    assert sorted(wrapped) == [f"eval-{eval_job}_0.out", f"eval-{eval_job}_1.out", f"train-{job}.out"], logs
    # finished tasks: no reason left over from their pending days, and their logs
    table = jobs_table(capsys, run_dir)
    for task in (0, 1):
        row = table[f"{eval_job}_{task}"]
        assert row[1] == "COMPLETED" and row[4] == "-" and Path(row[5]).is_file(), table


@pytest.mark.slurm
def test_a_failed_training_job_cancels_its_eval_array_and_jobs_says_why(slurm, tmp_path, capsys):
    """The job's python cannot import scifm's packages (-S: no site-packages), as when the venv
    was not activated; no corpus is needed to fail."""
    run_dir = tmp_path / "run"
    job = submit(run_dir, "--eval-after", *job_cluster(1, f"{sys.executable} -S"), "experiment=tiny",
                 f"hydra.run.dir={run_dir}")
    eval_job = json.loads((run_dir / "slurm" / "jobs.json").read_text())[1]["job_id"]
    slurm.wait_gone(eval_job, timeout=60)  # Slurm cancels it; no scancel here
    assert "ModuleNotFoundError" in log_of(run_dir, job)
    [info] = slurm.job(eval_job)
    assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied", info
    table = jobs_table(capsys, run_dir)
    kind, state, _, _, why, log = table[job]
    assert [kind, state, why, log] == ["train", "FAILED", "exit code 1", f"{run_dir}/slurm/train-{job}.out"], table
    # never started: no run time, no log
    assert table[f"{eval_job}_0-3"] == ["eval", "CANCELLED", "-", "0",
                                        f"cancelled: training job {job} failed (exit code 1)", "-"], (table, info)


@pytest.mark.slurm
def test_sweep_runs_as_a_job_array_with_a_run_directory_per_point(slurm, corpus_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    job = submit(sweep, "-m", *job_cluster(1), *base_overrides(corpus_dir), "trainer.max_steps=2",
                 "trainer.val_every=2", "trainer.ckpt_every=0", "trainer.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}")
    slurm.wait_gone(job)
    tasks = slurm.job(job)
    assert sorted((t["ArrayTaskId"], t["JobState"]) for t in tasks) == [("0", "COMPLETED"), ("1", "COMPLETED")], tasks
    for i, lr in enumerate(("0.001", "0.002")):
        assert f"trainer.lr={lr}" in yaml.safe_load((sweep / str(i) / ".hydra" / "overrides.yaml").read_text())
        assert yaml.safe_load((sweep / str(i) / "config.yaml").read_text())["trainer"]["lr"] == float(lr)
        assert sorted(losses(sweep / str(i))) == [1, 2]
    capsys.readouterr()
    scifm(["jobs", str(sweep)])
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [[f"{job}_0", "train", "COMPLETED"], [f"{job}_1", "train", "COMPLETED"]]
