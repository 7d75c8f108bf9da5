"""A real slurm cluster on this machine, for the launch tests: munged, slurmctld and two slurmd (nodes ``n1`` and
``n2`` on this host, one CPU each, both reached at 127.0.0.1), configured in a scratch directory and stopped at
the end — the processes started here and the jobs submitted to this cluster, nothing else.

Debian's ``slurm-wlm`` and ``munge`` packages provide it (``.ci/run`` installs them); it needs root, as slurm
runs the jobs as the submitting user and munged as its own user. :func:`start` returns the reason it cannot run
instead of a cluster when something is missing, so the tests can say why they are skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free TCP ports (slurm gives the nodes of one line a port range)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def _find(program: str) -> str | None:
    return shutil.which(program) or next((p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{program}", os.X_OK)), None)


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    nodes: list[str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def tasks(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job``'s fields (JobState, ExitCode, Restarts, StartTime, ...): one dict for a job, one
        per task (and one for the tasks not started yet) for an array."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(part.split("=", 1) for part in line.split() if "=" in part) for line in out.splitlines()
                if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        [info] = self.tasks(job_id)
        return info

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Wait until a job has ended; returns its fields."""
        return self.wait_all(job_id, timeout)[0]

    def wait_all(self, job_id: str, timeout: float = 300) -> list[dict[str, str]]:
        """Wait until a job, or every task of an array, has ended; returns their fields."""
        deadline = time.time() + timeout
        while True:
            tasks = self.tasks(job_id)
            if all(t.get("JobState") in ENDED for t in tasks):
                return tasks
            if time.time() > deadline:
                states = ", ".join(f"{t.get('JobId')} {t.get('JobState')}" for t in tasks)
                raise TimeoutError(f"job {job_id} not ended after {timeout} s: {states}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        path = self.root / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""


def config(root: Path, nodes: list[str], host: str, ports: list[int], socket_path: Path) -> str:
    """slurm.conf: the controller on ``ports[0]``, the nodes on ``ports[1]`` and up."""
    lines = [
        "ClusterName=cpt-tests",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={socket_path}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1",
        "JobRequeue=1",
        "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job`
        "KillWait=30",  # SIGTERM to SIGKILL: the time a cancelled run has to write its checkpoint
        "InactiveLimit=0",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd'}-%n.pid",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log'}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    # One line for both nodes: slurm refuses two lines with the same NodeHostname (several slurmd on one host).
    lines.append(f"NodeName={','.join(nodes)} NodeHostname={host} NodeAddr=127.0.0.1 "
                 f"Port={ports[1]}-{ports[1] + len(nodes) - 1} CPUs=1 RealMemory=4000")
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO")
    return "\n".join(lines) + "\n"


def start(timeout: float = 60) -> Cluster | str:
    """Start the cluster; a sentence saying why not when it cannot run here."""
    missing = [p for p in DAEMONS if _find(p) is None]
    if missing:
        return f"slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local slurm cluster needs root (munged runs as its own user, slurmd as root)"
    try:
        munge = pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (is the munge package installed?)"
    host = socket.gethostname().split(".")[0]
    if host == "localhost":
        return "this host is called 'localhost', the name of the cluster's first node"
    # Outside pytest's tmp directories (mode 0700, root's): munged, as its own user, must reach its socket.
    root = Path(tempfile.mkdtemp(prefix="cpt-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    key = munge_dir / "munge.key"
    subprocess.run([_find("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True)
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    os.chown(key, munge.pw_uid, munge.pw_gid)
    munge_dir.chmod(0o755)
    key.chmod(0o400)
    socket_path = munge_dir / "munge.socket.2"
    nodes = ["n1", "n2"]
    ports = [free_ports(1), free_ports(len(nodes))]
    conf = root / "slurm.conf"
    conf.write_text(config(root, nodes, host, ports, socket_path))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(root, env, nodes)
    log = open(root / "log" / "daemons.log", "ab")
    commands = [[_find("munged"), "-F", "--force", f"--key-file={key}", f"--socket={socket_path}",
                 f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                 f"--seed-file={munge_dir / 'munged.seed'}"]]
    cluster.processes.append(subprocess.Popen(commands[0], user=munge.pw_uid, group=munge.pw_gid, stdout=log,
                                              stderr=subprocess.STDOUT, env=env))
    deadline = time.time() + timeout
    while not socket_path.exists():
        if cluster.processes[0].poll() is not None or time.time() > deadline:
            stop(cluster)
            return f"munged did not start: {(munge_dir / 'munged.log').read_text(errors='replace')[-500:]}"
        time.sleep(0.05)
    cluster.processes.append(subprocess.Popen([_find("slurmctld"), "-D", "-i", "-f", str(conf)], stdout=log,
                                              stderr=subprocess.STDOUT, env=env))
    for node in nodes:
        cluster.processes.append(subprocess.Popen([_find("slurmd"), "-D", "-N", node, "-f", str(conf)], stdout=log,
                                                  stderr=subprocess.STDOUT, env=env))
    while True:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        if states.count("idle") == len(nodes):
            return cluster
        dead = [p.args[0] for p in cluster.processes if p.poll() is not None]
        if dead or time.time() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"nodes not idle after {timeout} s ({' '.join(states)})"
            logs = cluster.log("slurmctld.log")[-800:] + cluster.log(f"slurmd-{nodes[0]}.log")[-800:]
            stop(cluster)
            return f"slurm did not start: {why}: {logs}"
        time.sleep(0.2)


def stop(cluster: Cluster) -> None:
    """Cancel this cluster's jobs, then stop the daemons started by :func:`start`, newest first."""
    if any(p.poll() is None for p in cluster.processes[1:]):
        cluster.run("scancel", "--full", "--quiet", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False)
        deadline = time.time() + 40
        while cluster.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
            time.sleep(0.5)
    for process in reversed(cluster.processes):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if os.environ.get("CPT_SLURM_KEEP") != "1":  # set it to read the daemons' logs afterwards
        shutil.rmtree(cluster.root, ignore_errors=True)
