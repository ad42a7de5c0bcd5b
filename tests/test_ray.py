"""Ray launcher: same losses as local processes, restarts after a worker dies, fast resource errors.

One local Ray cluster serves the whole module: two Ray nodes of 1 CPU each on
this machine, so placement, node ranks and MASTER_ADDR take their multi-node
paths. The tiny job below takes a few seconds per run; most of each test's time
is starting the rank processes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from distattn.config import load_config  # noqa: E402
from distattn.train import ray_launch as rl  # noqa: E402  (sets Ray's environment defaults)
from distattn.train.launch import train_local  # noqa: E402

import ray  # noqa: E402

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
        "train.steps=4", "train.warmup_steps=1", "train.tensorboard=false"]
ROOT = Path(__file__).resolve().parent.parent


def tiny(out, *extra):
    return load_config(None, TINY + [f"run.output_dir={out}"] + list(extra))


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    store = 100 * 2**20
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": store})
    try:
        c.add_node(num_cpus=1, object_store_memory=store)
        ray.init(address=c.address, log_to_driver=True, logging_level="WARNING")
        c.wait_for_nodes()
        yield c.address
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job under the plain multiprocess launcher."""
    hist = train_local(tiny(tmp_path_factory.mktemp("local")), quiet=True, threads=1)
    return [h["loss"] for h in hist]


def _free_cpus(timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= 2.0 or time.monotonic() > deadline:
            return free
        time.sleep(0.25)


def test_ray_run_matches_local_launch(cluster, reference, tmp_path):
    hist = rl.train_ray(tiny(tmp_path, "launch.nodes=2"), quiet=True)  # one rank per node
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert [h["loss"] for h in hist] == pytest.approx(reference, rel=1e-6)
    assert (tmp_path / "checkpoints" / "step_00000004").is_dir()
    assert _free_cpus() == 2.0  # actors and placement groups released


def test_worker_death_restarts_from_latest_checkpoint(cluster, reference, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "fault.marker"
    monkeypatch.setenv(rl.FAULT_ENV, f"rank=1,step=3,marker={marker}")
    cfg = tiny(tmp_path / "run", "train.ckpt_every=2", "launch.max_failures=1")
    hist = rl.train_ray(cfg)
    out = capsys.readouterr().out
    assert marker.exists()  # rank 1 really exited before step 3
    assert "worker died: rank 1" in out and "restarting from step 2 (attempt 1/1)" in out, out
    # every step once, and the same numbers as a run nobody interrupted
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert [h["loss"] for h in hist] == pytest.approx(reference, rel=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000004"
    # each rank's log holds both attempts (the dead one's lines up to its exit)
    log = (tmp_path / "run" / "logs" / "rank1.log").read_text()
    assert log.count("=== distattn rank 1 (trainer)") == 2, log


def test_worker_death_without_restarts_fails(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv(rl.FAULT_ENV, f"rank=1,step=1,marker={tmp_path / 'm'}")
    t0 = time.monotonic()
    with pytest.raises(rl.WorkerFailure, match=r"worker died: rank 1.*launch.max_failures=0"):
        rl.train_ray(tiny(tmp_path, "launch.max_failures=0"), quiet=True)
    assert time.monotonic() - t0 < 60
    assert _free_cpus() == 2.0


@pytest.mark.parametrize("overrides,message", [
    (["launch.cpus_per_worker=4"], r"2 workers x 4 CPU = 8 CPU, but the Ray cluster has 2 CPU"),
    (["launch.gpus_per_worker=1"], r"2 workers x 1 GPU = 2 GPU, but the Ray cluster has 0 GPU"),
    (["parallel.world_size=4", "parallel.dp=2", "launch.cpus_per_worker=0.5", "launch.nodes=1"],
     r"launch.nodes=1 puts 4 workers .* 2 alive nodes and 0 can hold 4"),
    (["launch.placement=STRICT_PACK"], r"needs all 2 workers on one node, but the largest node holds 1"),
    (["parallel.backend=nccl"], r"parallel.backend=nccl needs a GPU per rank"),
])
def test_oversized_requests_fail_fast(cluster, tmp_path, overrides, message):
    t0 = time.monotonic()
    with pytest.raises(rl.LaunchError, match=message):
        rl.train_ray(tiny(tmp_path, *overrides), quiet=True)
    assert time.monotonic() - t0 < 5


def test_cli_reports_resource_errors(cluster, tmp_path, capsys):
    from distattn.cli import main
    args = ["train", "--launcher", "ray"] + [a for o in TINY + [f"run.output_dir={tmp_path}",
                                                                "launch.cpus_per_worker=3"]
                                             for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "launch error" in err and "6 CPU" in err and "launch.cpus_per_worker" in err


def test_roles_env_and_placement_groups(cluster, tmp_path):
    cfg = tiny(tmp_path, "parallel.world_size=3", "parallel.attention_servers=1", "attention.scheme=cad",
               "launch.cpus_per_worker=0.5")
    nodes = rl.cluster_nodes()
    plan = rl.plan_placement(cfg, nodes)
    assert [s.role for s in plan.slots] == ["trainer", "trainer", "server"]
    group = rl.WorkerGroup(plan, cfg, nodes)
    try:
        group.start(30)
        assert set(group.pgs) == {"trainer", "server"}  # one placement group per role
        assert group.pgs["trainer"].bundle_count == 2 and group.pgs["server"].bundle_count == 1
        got = group.run(rl.probe_rank, cfg.model_dump())
        assert [g["placement_group"] for g in got] == \
            [group.pgs["trainer"].id.hex()] * 2 + [group.pgs["server"].id.hex()]
        address = {n.node_id: n.address for n in nodes}
        order = list(dict.fromkeys(g["node_id"] for g in got))  # nodes by their lowest rank
        for r, g in enumerate(got):
            env = g["env"]
            on_node = [q for q, h in enumerate(got) if h["node_id"] == g["node_id"]]
            assert g["rank"] == r and g["world"] == 3 and g["sum"] == 3.0
            assert g["backend"] == "gloo"  # CPU workers
            assert env["RANK"] == str(r) and env["WORLD_SIZE"] == "3"
            assert env["LOCAL_RANK"] == str(on_node.index(r))
            assert env["LOCAL_WORLD_SIZE"] == str(len(on_node))
            assert env["NODE_RANK"] == str(order.index(g["node_id"]))
            assert env["MASTER_ADDR"] == address[got[0]["node_id"]] and int(env["MASTER_PORT"]) > 0
            assert env["DISTATTN_ROLE"] == ("server" if r == 2 else "trainer")
        assert len({g["pid"] for g in got}) == 3
    finally:
        group.shutdown()


def test_nodes_pin_ranks(cluster, tmp_path):
    cfg = tiny(tmp_path, "launch.nodes=2")
    nodes = rl.cluster_nodes()
    plan = rl.plan_placement(cfg, nodes)
    group = rl.WorkerGroup(plan, cfg, nodes)
    try:
        group.start(30)
        got = group.run(rl.probe_rank, cfg.model_dump())
    finally:
        group.shutdown()
    assert [g["node_id"] for g in got] == [s.node_id for s in plan.slots]
    assert len({g["node_id"] for g in got}) == 2
    assert [(g["env"]["NODE_RANK"], g["env"]["LOCAL_RANK"]) for g in got] == [("0", "0"), ("1", "0")]


def test_rank_prefixes():
    assert [repr(rl.Rank(r, role)) for r, role in [(0, "trainer"), (3, "server")]] == \
        ["rank0", "rank3:server"]


def test_plan_spreads_ranks_over_nodes():
    from distattn.train.ray_launch import NodeInfo, plan_placement
    nodes = [NodeInfo("b", "10.0.0.2", {"CPU": 8.0, "GPU": 2.0}),
             NodeInfo("a", "10.0.0.1", {"CPU": 8.0, "GPU": 2.0}, is_driver=True)]
    cfg = load_config(None, ["parallel.world_size=4", "parallel.dp=2", "launch.nodes=2"])
    plan = plan_placement(cfg, nodes)
    assert plan.bundle == {"CPU": 1.0, "GPU": 1.0}  # the cluster has GPUs: one per rank
    assert [s.node_id for s in plan.slots] == ["a", "a", "b", "b"]  # the driver's node first
    # 3 nodes of 1.5 CPUs hold 3 one-CPU workers, although they have 4.5 CPUs
    small = [NodeInfo(str(i), f"10.0.0.{i}", {"CPU": 1.5}) for i in range(3)]
    with pytest.raises(rl.LaunchError, match="hold 3 such workers"):
        plan_placement(load_config(None, ["parallel.world_size=4", "parallel.dp=2"]), small)
    with pytest.raises(rl.LaunchError, match="largest node holds 1"):
        plan_placement(load_config(None, ["launch.placement=STRICT_PACK"]), small)


def test_environment_orders_gpus_by_local_rank():
    from distattn.train.ray_launch import NodeInfo, WorkerGroup, plan_placement
    nodes = [NodeInfo("a", "10.0.0.1", {"CPU": 8.0, "GPU": 2.0}, is_driver=True),
             NodeInfo("b", "10.0.0.2", {"CPU": 8.0, "GPU": 2.0})]
    cfg = load_config(None, ["parallel.world_size=4", "parallel.dp=2"])
    group = WorkerGroup(plan_placement(cfg, nodes), cfg, nodes)
    group.info = [{"node_id": n, "gpu_ids": [g], "pid": 1, "host": "h"}
                  for n, g in [("b", "1"), ("b", "0"), ("a", "0"), ("a", "1")]]
    envs = group.environments(29500)
    assert [e["NODE_RANK"] for e in envs] == ["0", "0", "1", "1"]  # rank 0's node is node 0
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.2"}
    # device LOCAL_RANK is the rank's own GPU
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1,0", "1,0", "0,1", "0,1"]


def test_launcher_choice(monkeypatch):
    from distattn.cli import main, pick_launcher
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert pick_launcher("auto", None) == "ray"
    assert pick_launcher("local", None) == "local"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert pick_launcher("auto", None) == "torchrun"
    assert main(["train", "--launcher", "local", "--address", "auto"]) == 2


def _spawn(args, log, **kw):
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _wait_for(proc, path: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.25)
    return False


def test_ctrl_c_stops_every_rank(cluster, tmp_path):
    log_path = tmp_path / "out.log"
    sets = [a for o in TINY[:-3] + ["train.steps=10000", "train.warmup_steps=1", "train.log_every=1",
                                   "train.tensorboard=false", f"run.output_dir={tmp_path / 'run'}"]
            for a in ("--set", o)]
    with open(log_path, "w") as log:
        p = _spawn([sys.executable, "-m", "distattn.cli", "train", "--address", cluster, *sets], log)
        try:
            assert _wait_for(p, log_path, "step     1/", 90), log_path.read_text()
            os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            rc = p.wait(30)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert rc == 130 and "interrupted; all ranks stopped" in out, out
    # streamed into a file as they came (step 1 was there before the Ctrl-C), with the rank prefix
    assert "(rank0 pid=" in out
    assert "\x1b[" not in out  # no colour codes into a file
    assert _free_cpus() == 2.0  # both ranks are gone from the cluster


def test_torchrun_env_without_ray(tmp_path, monkeypatch, capsys):
    """Users without Ray: a torchrun-style env (one rank here) is picked up by the CLI."""
    import torch.distributed as dist

    from distattn.cli import main
    from distattn.multiproc import free_port
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    sets = [a for o in TINY + ["train.steps=2", "parallel.world_size=1", "parallel.cp=1",
                               "attention.scheme=local", f"run.output_dir={tmp_path}"] for a in ("--set", o)]
    assert main(["train", *sets]) == 0
    assert "step     2/2" in capsys.readouterr().out
    assert not dist.is_initialized()
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()


@pytest.mark.skipif(not os.environ.get("DISTATTN_RAY_TRAIN_TESTS"),
                    reason="Ray Train adds 20-30 s of start-up per attempt on 2 cores (about 50 s "
                           "here); set DISTATTN_RAY_TRAIN_TESTS=1 to run")
def test_ray_train_engine_restarts_and_matches_local(cluster, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(rl.FAULT_ENV, f"rank=1,step=3,marker={tmp_path / 'm'}")
    cfg = tiny(tmp_path / "run", "launch.engine=ray_train", "train.ckpt_every=2", "launch.max_failures=1")
    hist = rl.train_ray(cfg, quiet=True)
    assert (tmp_path / "m").exists()
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert [h["loss"] for h in hist] == pytest.approx(reference, rel=1e-6)
