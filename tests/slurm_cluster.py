"""A real Slurm cluster of two "nodes" on this machine, for the launch tests: Debian's slurmctld and two
slurmd (named `hostname -s` and `localhost`, both at 127.0.0.1, their own ports and spool dirs),
auth/none (no munge), everything under one private directory. Facts: ../shared/reference/launch_facts.md.

    with SlurmCluster(tmp_dir) as cluster:
        subprocess.run(["sbatch", "--wait", ...], env=cluster.env)
"""

import os
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def available() -> bool:
    return all(shutil.which(name) for name in DAEMONS)


def _free_ports(count):
    """Distinct free ports below the ephemeral range (peft_ds.distributed.free_port)."""
    from peft_ds.distributed import free_port

    ports = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


class SlurmCluster:
    def __init__(self, root, cpus=2):
        self.root = str(root)
        self.nodes = [socket.gethostname().split(".")[0], "localhost"]  # 'localhost' must not come first
        self.cpus = cpus
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def _write_conf(self):
        ctld, *node_ports = _free_ports(1 + len(self.nodes))
        for sub in ("state", "log", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        lines = [
            "ClusterName=peftds", f"SlurmctldHost={self.nodes[0]}(127.0.0.1)", f"SlurmctldPort={ctld}",
            "AuthType=auth/none", "CredType=cred/none", "SlurmUser=root", "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
            "MinJobAge=5", "KillWait=5", "JobRequeue=1", "SchedulerParameters=sched_interval=1",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.%n.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log", f"SlurmdLogFile={self.root}/log/slurmd.%n.log",
            f"TmpFS={self.root}/tmp/%n",
        ]
        for name, port in zip(self.nodes, node_ports):
            os.makedirs(os.path.join(self.root, "spool", name), exist_ok=True)
            os.makedirs(os.path.join(self.root, "tmp", name), exist_ok=True)
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout=60):
        self._write_conf()
        subprocess.run(["slurmctld", "-f", self.conf, "-i"], env=self.env, check=True)
        for name in self.nodes:
            subprocess.run(["slurmd", "-f", self.conf, "-N", name], env=self.env, check=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm nodes not idle after {timeout} s: {r.stdout} {r.stderr}\n{self.logs()}")

    def logs(self):
        out = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            with open(os.path.join(self.root, "log", name)) as f:
                out.append(f"== {name}\n" + f.read()[-3000:])
        return "\n".join(out)

    def stop(self):
        pids = [os.path.join(self.root, f) for f in os.listdir(self.root) if f.endswith(".pid")]
        for path in pids:
            try:
                with open(path) as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 10
        for path in pids:
            while time.time() < deadline and os.path.exists(path):
                time.sleep(0.1)

    def job_state(self, job_id):
        r = subprocess.run(["scontrol", "show", "job", str(job_id)], env=self.env, capture_output=True, text=True)
        for field in r.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
