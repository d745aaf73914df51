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
from helpers.slurm_cluster import SlurmCluster, Unavailable

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


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records}


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


@pytest.mark.parametrize("args, message", [
    (["experiment=tiny"], "sbatch not found on PATH"),
    (["--dry-run", "experiment=tiny", "cluster=nowhere"], "cluster=nowhere: unknown cluster; available: gpu, local"),
    (["--dry-run", "experiment=tiny", "cluster.nodes=2"], "cluster: nodes=2 x 1 CPU task per node = 2 processes, "
                                                          "but the parallel layout"),
    (["--dry-run", "experiment=tiny", "cluster=gpu", "parallel.tp=8"], "parallel.tp: n_heads="),
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


def job_cluster(nodes: int) -> list[str]:
    return ["cluster=local", f"cluster.nodes={nodes}", "cluster.time=00:10:00", f"cluster.python={sys.executable}"]


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
                         "trainer.max_steps=10", "trainer.ckpt_every=0", f"hydra.run.dir={run_dir}")
            for case, run_dir in runs.items()}
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
def test_eval_after_reports_every_checkpoint(slurm, corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    submit(run_dir, "--eval-after", "--eval-override", "eval.max_items=4", *job_cluster(1), *base_overrides(corpus_dir),
           "trainer.max_steps=4", "trainer.val_every=2", "trainer.ckpt_every=2", f"hydra.run.dir={run_dir}")
    eval_job = json.loads((run_dir / "slurm" / "jobs.json").read_text())[1]["job_id"]
    capsys.readouterr()
    scifm(["jobs", str(run_dir)])
    assert [f"{eval_job}_0-1", "eval", "PENDING"] in [r.split()[:3] for r in capsys.readouterr().out.splitlines()]
    slurm.wait_gone(eval_job)
    tasks = slurm.job(eval_job)
    logs = {p.name: p.read_text()[-2000:] for p in (run_dir / "slurm").glob("eval-*.out")}
    assert sorted(t["JobState"] for t in tasks) == ["COMPLETED", "COMPLETED"], (tasks, logs)
    for step in (2, 4):
        assert (run_dir / "eval" / f"step_{step}" / "results.json").is_file(), logs
        assert (run_dir / "eval" / f"step_{step}" / "report.md").is_file(), logs


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
