"""The embedded Ray listens on loopback only (issue 14, finding 6).

A child process starts the embedded Ray the way every job does (``init_ray``), runs an
actor and a two-worker Ray Train run set up as ``grade-ray train`` sets it up, and lists,
from inside that run (its DDP process group up), every listening TCP socket of its process
tree (from /proc: the driver, gcs_server, raylet, the dashboard and its agents, the
monitor, workers, the learners). None may be on a non-loopback address: before, the
metrics exporters of the monitor, dashboard and agent listened on 0.0.0.0, gcs_server and
raylet on every interface, and torch's rendezvous store of the learners on every interface.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import ipaddress, json, os, time
    import ray
    from grade_ray.raysession import init_ray

    init_ray(num_cpus=1)

    @ray.remote
    class Echo:
        def ping(self):
            return os.getpid()

    actor = Echo.remote()
    ray.get(actor.ping.remote())
    time.sleep(5)  # the dashboard agent and metrics exporters start asynchronously

    def children(root=None):
        kids = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = open(f"/proc/{d}/stat").read()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
        tree, todo = set(), [root or os.getpid()]
        while todo:
            p = todo.pop()
            tree.add(p)
            todo += kids.get(p, [])
        return tree

    def socket_owners(pids):
        owners = {}
        for pid in pids:
            try:
                name = open(f"/proc/{pid}/comm").read().strip()
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        owners[target[8:-1]] = name
            except OSError:
                continue
        return owners

    def listening(owners):
        out = []
        for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
            for line in open(table).read().splitlines()[1:]:
                f = line.split()
                if f[3] != "0A" or f[9] not in owners:  # 0A = LISTEN
                    continue
                hexip, port = f[1].split(":")
                raw = bytes.fromhex(hexip)
                if v6:  # four little-endian 32-bit words
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                else:
                    raw = raw[::-1]
                out.append([owners[f[9]], ipaddress.ip_address(raw).compressed, int(port, 16)])
        return out

    def train_loop(config):
        import torch.distributed as dist
        assert dist.is_initialized() and dist.get_world_size() == 2
        dist.barrier()
        if dist.get_rank() == 0:
            found = listening(socket_owners(children(config["root"])))
            with open(config["out"], "w") as f:
                json.dump(found, f)
        dist.barrier()

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from grade_ray.raysession import local_only_session, loopback_torch_config

    assert local_only_session()
    TorchTrainer(
        train_loop,
        train_loop_config={"root": os.getpid(), "out": os.path.abspath("sockets.json")},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(storage_path=os.path.abspath("train")),
        torch_config=loopback_torch_config(),
    ).fit()
    print("SOCKETS " + open("sockets.json").read())
    ray.shutdown()
    """
)


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_embedded_ray_listens_on_loopback_only(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": "",
    }
    env.pop("RAY_ADDRESS")
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("SOCKETS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    sockets = json.loads(lines[0][len("SOCKETS ") :])
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the check saw the Ray processes
    assert len(sockets) >= 8, sockets  # servers, dashboard, agents, metrics exporters
    assert any(name.startswith("ray::RayTrainWo") for name in names), names
    exposed = [s for s in sockets if not _loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_loopback_only_restores_the_environment():
    from ray._private import ray_constants

    from grade_ray.raysession import _LOCAL_ONLY_ENV, loopback_only

    before = (os.environ.get(_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER)
    with loopback_only():
        assert os.environ[_LOCAL_ONLY_ENV] == "0" and not ray_constants.ENABLE_RAY_CLUSTER
    assert (os.environ.get(_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER) == before
