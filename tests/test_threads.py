"""The thread policy: CPU limits parsed from fake cgroup files and environments, the overrides' order, the
budget's split among parallel runs, OpenMP's wait policy set before torch loads, and what ``mergelab plan``
prints. No timings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelab import threads
from mergelab.cli.main import main
from mergelab.errors import MergelabError
from mergelab.threads import Limits

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """Every test leaves torch's thread count and the applied policy as it found them."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_applied", None)
    yield
    torch.set_num_threads(before)


# ---- cgroup files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "cpus"), [("max 100000", None), ("max", None), ("150000 100000", 1.5),
                                             ("200000 100000\n", 2.0), ("50000 100000", 0.5), ("", None),
                                             (None, None), ("garbage here", None), ("-1 100000", None)])
def test_cgroup_v2_cpu_max(text, cpus):
    assert threads.cgroup_v2_quota(text) == cpus


@pytest.mark.parametrize(("quota", "period", "cpus"), [("-1", "100000", None), ("200000\n", "100000\n", 2.0),
                                                       ("150000", "100000", 1.5), (None, "100000", None),
                                                       ("100000", None, None), ("x", "100000", None)])
def test_cgroup_v1_quota_and_period(quota, period, cpus):
    assert threads.cgroup_v1_quota(quota, period) == cpus


@pytest.mark.parametrize(("quota", "whole"), [(None, None), (0.5, 1), (1.0, 1), (1.5, 2), (2.0, 2), (3.01, 4)])
def test_a_fractional_quota_is_rounded_up_to_at_least_one_thread(quota, whole):
    assert threads.quota_cpus(quota) == whole


def fake_files(files: dict[str, str]):
    return lambda path: files.get(path)


def test_v2_container_quota_at_the_mount_root():
    files = {"/sys/fs/cgroup/cpu.max": "250000 100000\n"}
    assert threads.cgroup_cpus(fake_files(files), "0::/\n") == 3


def test_v2_a_parent_cgroups_tighter_quota_wins():
    files = {"/sys/fs/cgroup/user.slice/job/cpu.max": "max 100000", "/sys/fs/cgroup/user.slice/cpu.max": "100000 100000"}
    assert threads.cgroup_cpus(fake_files(files), "0::/user.slice/job\n") == 1
    files["/sys/fs/cgroup/user.slice/job/cpu.max"] = "50000 100000"  # the own one tighter still: at least 1
    assert threads.cgroup_cpus(fake_files(files), "0::/user.slice/job\n") == 1


def test_v2_a_host_path_missing_in_the_container_falls_back_to_the_root():
    files = {"/sys/fs/cgroup/cpu.max": "400000 100000"}
    assert threads.cgroup_cpus(fake_files(files), "0::/docker/0123abcd\n") == 4


def test_v1_cpu_controller_quota():
    self_cgroup = "12:pids:/docker/ab\n4:cpu,cpuacct:/docker/ab\n1:name=systemd:/docker/ab\n"
    files = {"/sys/fs/cgroup/cpu,cpuacct/docker/ab/cpu.cfs_quota_us": "150000\n",
             "/sys/fs/cgroup/cpu,cpuacct/docker/ab/cpu.cfs_period_us": "100000\n"}
    assert threads.cgroup_cpus(fake_files(files), self_cgroup) == 2
    unlimited = {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}
    assert threads.cgroup_cpus(fake_files(unlimited), "2:cpuacct:/\n1:cpu:/\n0::/\n") is None


@pytest.mark.parametrize("self_cgroup", [None, "", "0::/\n", "1:cpu:/\n0::/\n"])
def test_no_cgroup_files_means_no_quota(self_cgroup):
    assert threads.cgroup_cpus(fake_files({}), self_cgroup) is None


def test_without_proc_self_cgroup_the_roots_files_are_read():
    files = {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "300000", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}
    assert threads.cgroup_cpus(fake_files(files), None) == 3


def test_this_machines_limits_are_found_without_error():
    found = threads.limits({})
    assert found.affinity >= 1 and found.omp is None and found.ray is None
    assert found.quota is None or found.quota >= 1


# ---- the policy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "threads_"), [("4", 4), ("4,2", 4), (" 3 ", 3), ("0", None), ("x", None),
                                                 ("", None), ("-2", None)])
def test_omp_num_threads(value, threads_):
    assert threads.omp_threads({"OMP_NUM_THREADS": value}) == threads_
    assert threads.omp_threads({}) is None


def test_the_tightest_limit_is_the_budget_and_named():
    policy = threads.choose(None, {}, Limits(affinity=8, quota=3, omp=None))
    assert (policy.threads, policy.source) == (3, "the cgroup CPU quota")
    policy = threads.choose(None, {}, Limits(affinity=2, quota=3, omp=4))
    assert (policy.threads, policy.source) == (2, "the affinity mask")
    policy = threads.choose(None, {}, Limits(affinity=8, quota=None, omp=2))
    assert (policy.threads, policy.source) == (2, "OMP_NUM_THREADS")


def test_overrides_come_before_the_limits_in_order():
    found = Limits(affinity=8, quota=2)
    assert threads.choose(None, {"MERGELAB_THREADS": "6"}, found).threads == 6
    assert threads.choose(None, {"MERGELAB_THREADS": "auto"}, found).threads == 2
    policy = threads.choose(5, {"MERGELAB_THREADS": "6"}, found)
    assert (policy.threads, policy.source) == (5, "--threads")
    assert threads.choose("3", {"MERGELAB_THREADS": "legacy"}, found).threads == 3
    assert threads.choose("auto", {"MERGELAB_THREADS": "6"}, found).threads == 6


def test_legacy_turns_the_policy_off():
    found = Limits(affinity=8)
    assert threads.choose(None, {"MERGELAB_THREADS": "legacy"}, found).threads is None
    assert threads.choose("legacy", {"MERGELAB_THREADS": "4"}, found).threads is None


def test_in_a_ray_task_its_cpus_are_the_budget_whatever_mergelab_threads_says():
    found = Limits(affinity=16, ray=2)
    policy = threads.choose(None, {"MERGELAB_THREADS": "8"}, found)
    assert (policy.threads, policy.source) == (2, "the Ray task's CPUs")
    assert threads.choose(None, {"MERGELAB_THREADS": "legacy"}, found).threads is None


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", 0, True])
def test_a_bad_thread_count_is_refused(bad):
    with pytest.raises(MergelabError, match="positive number, auto or legacy"):
        threads.choose(bad, {}, Limits(affinity=2))
    with pytest.raises(MergelabError):
        threads.choose(None, {"MERGELAB_THREADS": str(bad)}, Limits(affinity=2))


# ---- the split among parallel runs -----------------------------------------------------------------------

@pytest.mark.parametrize(("total", "runs", "per_node", "share"),
                         [(2, 4, None, 1), (8, 2, None, 4), (8, 3, None, 2), (8, 1, 4, 4), (1, 5, None, 1),
                          (16, 2, 4, 4), (4, 0, None, 4)])
def test_the_budget_is_divided_among_parallel_runs(total, runs, per_node, share):
    assert threads.split(total, runs, per_node) == share


class FakeRay:
    def __init__(self, cpus: float, nodes: list[float]):
        self.cpus, self.node_cpus = cpus, nodes

    def cluster_resources(self):
        return {"CPU": self.cpus}

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": c}} for c in self.node_cpus] + [{"Alive": False, "Resources": {"CPU": 64}}]


def test_ray_tasks_get_a_share_of_the_cluster_each(monkeypatch):
    monkeypatch.delenv("MERGELAB_THREADS", raising=False)
    assert threads.ray_task_cpus(2, FakeRay(8, [4, 4])) == 4
    assert threads.ray_task_cpus(1, FakeRay(8, [4, 4])) == 4  # one task runs on one machine
    assert threads.ray_task_cpus(8, FakeRay(8, [4, 4])) == 1
    assert threads.ray_task_cpus(3, FakeRay(2, [2])) == 1


def test_ray_tasks_take_one_cpu_each_with_the_policy_off(monkeypatch):
    monkeypatch.setenv("MERGELAB_THREADS", "legacy")
    assert threads.ray_task_cpus(2, FakeRay(8, [8])) == 1


def test_ray_workers_inherit_the_wait_policy_and_the_switch(monkeypatch):
    for name in (*threads.WAIT_VARIABLES, "MERGELAB_THREADS", "_MERGELAB_SET_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    assert threads.worker_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("MERGELAB_THREADS", "3")
    assert threads.worker_env() == {"OMP_WAIT_POLICY": "ACTIVE", "MERGELAB_THREADS": "3"}


# ---- applying it -----------------------------------------------------------------------------------------

def test_apply_sets_torch_and_the_blas_to_the_budget():
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=None):  # restores the BLAS libraries' counts afterwards
        policy = threads.apply(threads.Policy(1, "test", Limits(affinity=2)))
        assert policy.threads == 1 and torch.get_num_threads() == 1
        assert all(lib["num_threads"] == 1 for lib in threadpool_info() if lib["user_api"] == "blas")


def test_the_python_api_only_lowers_what_the_caller_set():
    torch.set_num_threads(1)
    policy = threads.apply(threads.Policy(2, "the affinity mask", Limits(affinity=2)), own_process=False)
    assert policy.threads == 1 and torch.get_num_threads() == 1 and "kept" in policy.source


def test_ensure_applies_once_per_process(monkeypatch):
    monkeypatch.setenv("MERGELAB_THREADS", "1")
    first = threads.ensure()
    monkeypatch.setenv("MERGELAB_THREADS", "2")
    assert threads.ensure() is first and torch.get_num_threads() == 1


def test_legacy_changes_nothing(monkeypatch):
    torch.set_num_threads(2)
    policy = threads.apply(threads.choose("legacy", {}, Limits(affinity=1)))
    assert policy.threads is None and torch.get_num_threads() == 2
    assert "not managed" in policy.describe()


# ---- OpenMP's waiting ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "changes"), [({}, {"OMP_WAIT_POLICY": "PASSIVE", "_MERGELAB_SET_WAIT_POLICY": "1"}),
                                              ({"OMP_WAIT_POLICY": "ACTIVE"}, {}), ({"GOMP_SPINCOUNT": "1000"}, {}),
                                              ({"KMP_BLOCKTIME": "10"}, {}), ({"MERGELAB_THREADS": "legacy"}, {}),
                                              ({"MERGELAB_THREADS": "2"}, {"OMP_WAIT_POLICY": "PASSIVE",
                                                                           "_MERGELAB_SET_WAIT_POLICY": "1"})])
def test_wait_policy_unless_the_user_tuned_it(env, changes):
    assert threads.wait_env(env) == changes


@pytest.mark.parametrize(("argv", "cli"), [(["/venv/bin/mergelab", "plan"], True), (["-m", "plan"], True),
                                           (["C:\\x\\mergelab.exe"], True), (["/usr/bin/python3"], False),
                                           (["/x/pytest", "-q"], False), ([], False), (["-c"], False)])
def test_the_command_is_recognised_from_argv(argv, cli):
    assert threads.launched_as_cli(argv) is cli


def test_too_late_once_torch_is_loaded():
    env: dict[str, str] = {}
    assert threads.before_torch(["/venv/bin/mergelab", "plan"], env) is False and env == {}


def test_threads_may_follow_the_command():
    assert threads.hoist_threads(["merge", "--out", "o", "--threads", "2"]) == ["--threads", "2", "merge", "--out", "o"]
    assert threads.hoist_threads(["plan", "--threads=legacy", "x"]) == ["--threads=legacy", "plan", "x"]
    assert threads.hoist_threads(["plan", "--", "--threads", "2"]) == ["plan", "--", "--threads", "2"]
    assert threads.cli_threads(["merge", "--threads", "legacy"]) == "legacy"
    assert threads.cli_threads(["merge"]) is None


HOOK = textwrap.dedent("""
    import os, sys

    class _SeeTorch:  # records OMP_WAIT_POLICY when torch is first imported
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.stderr.write("AT-TORCH-IMPORT OMP_WAIT_POLICY=%s\\n" % os.environ.get("OMP_WAIT_POLICY"))
                sys.meta_path.remove(self)
            return None

    sys.meta_path.insert(0, _SeeTorch())
""")


def run_with_hook(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    clean = {k: v for k, v in os.environ.items() if k not in (*threads.WAIT_VARIABLES, "MERGELAB_THREADS",
                                                               "_MERGELAB_SET_WAIT_POLICY")}
    clean.update(env, PYTHONPATH=os.pathsep.join([str(tmp_path), SRC]), OMP_DISPLAY_ENV="VERBOSE")
    return subprocess.run([sys.executable, *args], env=clean, capture_output=True, text=True, timeout=120)


def test_the_command_sets_the_wait_policy_before_torch_is_imported(tmp_path):
    done = run_with_hook(tmp_path, ["-m", "mergelab", "methods"], {})
    assert done.returncode == 0, done.stderr
    assert "AT-TORCH-IMPORT OMP_WAIT_POLICY=PASSIVE" in done.stderr
    if "GOMP_SPINCOUNT" in done.stderr:  # libgomp (torch's runtime on Linux) took it: it never spins
        assert "GOMP_SPINCOUNT = '0'" in done.stderr


def test_the_console_script_sets_it_too(tmp_path):
    script = "import sys; sys.argv[0] = '/venv/bin/mergelab'; from mergelab.cli.main import main; sys.exit(main())"
    done = run_with_hook(tmp_path, ["-c", script, "methods"], {})
    assert done.returncode == 0, done.stderr
    assert "AT-TORCH-IMPORT OMP_WAIT_POLICY=PASSIVE" in done.stderr


@pytest.mark.parametrize(("env", "args", "seen"), [({"OMP_WAIT_POLICY": "ACTIVE"}, [], "ACTIVE"),
                                                   ({"MERGELAB_THREADS": "legacy"}, [], "None"),
                                                   ({}, ["--threads", "legacy"], "None")])
def test_a_users_choice_is_kept(tmp_path, env, args, seen):
    done = run_with_hook(tmp_path, ["-m", "mergelab", "methods", *args], env)
    assert done.returncode == 0, done.stderr
    assert f"AT-TORCH-IMPORT OMP_WAIT_POLICY={seen}" in done.stderr


def test_the_python_api_leaves_the_environment_alone(tmp_path):
    done = run_with_hook(tmp_path, ["-c", "import mergelab"], {})
    assert done.returncode == 0, done.stderr
    assert "AT-TORCH-IMPORT OMP_WAIT_POLICY=None" in done.stderr


# ---- mergelab plan ---------------------------------------------------------------------------------------

@pytest.fixture
def model_files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=gen)}
    paths = []
    for i in range(3):
        state = base if i == 0 else {"w": base["w"] + 0.1 * torch.randn(8, 8, generator=gen)}
        save_file(state, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    return ["--method", "ties", "--base", paths[0], "--model", paths[1], "--model", paths[2]]


def test_plan_prints_the_policy(model_files, capsys, monkeypatch):
    monkeypatch.delenv("MERGELAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["plan", *model_files]) == 0
    out = capsys.readouterr().out
    found = threads.limits({})
    budget = min(n for n in (found.affinity, found.quota) if n is not None)
    assert f"threads       {budget} from the " in out and "openmp wait   " in out


def test_plan_prints_an_override_and_its_source(model_files, capsys, monkeypatch):
    assert main(["plan", *model_files, "--threads", "1"]) == 0
    assert "threads       1 from --threads" in capsys.readouterr().out
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("MERGELAB_THREADS", "3")
    assert main(["plan", *model_files]) == 0
    assert "threads       3 from MERGELAB_THREADS" in capsys.readouterr().out
    monkeypatch.setenv("MERGELAB_THREADS", "legacy")
    assert main(["plan", *model_files]) == 0
    assert "threads       not managed" in capsys.readouterr().out


def test_a_bad_threads_option_exits_2(model_files, capsys):
    assert main(["--threads", "none", "plan", *model_files]) == 2
    assert "positive number, auto or legacy" in capsys.readouterr().err


# ---- Ray: each task computes on its share ----------------------------------------------------------------

def _probe_policy(index: int) -> tuple[int | None, str, int, str | None]:
    from mergelab import threads as worker_threads

    policy = worker_threads.in_task()
    return policy.threads, policy.source, torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY")


def test_ray_tasks_compute_on_their_share_and_do_not_spin(monkeypatch):
    pytest.importorskip("ray")
    for name in (*threads.WAIT_VARIABLES, "MERGELAB_THREADS", "_MERGELAB_SET_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    from mergelab.distributed import connect, disconnect, run_tasks

    started = connect("local:2")
    try:
        alone = [result for _, result, _ in run_tasks(_probe_policy, [(0,)])]
        three = [result for _, result, _ in run_tasks(_probe_policy, [(i,) for i in range(3)])]
    finally:
        disconnect(started)
    if not started:  # a Ray instance of another test module, of its own size: only the form is checked
        assert all(r[1] == "the Ray task's CPUs" for r in alone + three)
        return
    assert alone == [(2, "the Ray task's CPUs", 2, "PASSIVE")]
    assert three == [(1, "the Ray task's CPUs", 1, "PASSIVE")] * 3
