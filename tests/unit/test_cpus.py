"""NGINX_WORKER_PROCESSES=auto: the CPU count from affinity and cgroup quotas (pure parts)."""

from __future__ import annotations

import pytest

from synapse_workers.run import cpus
from synapse_workers.run.nginx_start import with_worker_processes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max 100000\n", None), ("50000 100000\n", 0.5), ("150000 100000", 1.5), ("200000 100000", 2.0), ("", None)],
)
def test_cgroup_v2_cpu_max(text, expected):
    assert cpus.quota_v2(text) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("-1\n", "100000\n", None), ("100000", "100000", 1.0), ("25000", "100000", 0.25), ("x", "1", None)],
)
def test_cgroup_v1_cfs_quota(quota, period, expected):
    assert cpus.quota_v1(quota, period) == expected


@pytest.mark.parametrize(
    ("affinity", "quotas", "expected"),
    [
        (16, [], 16),  # no quota: the affinity mask
        (16, [1.0], 1),  # docker --cpus=1 on a 16-core host
        (16, [1.5], 2),  # quota is time: 1.5 CPUs keep two workers busy part of the time
        (16, [0.25], 1),  # never fewer than one
        (2, [4.0], 2),  # never more than the CPUs we may run on
        (8, [3.0, 2.0], 2),  # the tightest quota on the way up wins
    ],
)
def test_cpus_from(affinity, quotas, expected):
    assert cpus.cpus_from(affinity, quotas) == expected


def test_cgroup_paths_and_mounts():
    proc_cgroup = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/system.slice/x.service\n"
    assert cpus.cgroup_paths(proc_cgroup)["cpu"] == "/docker/abc"
    assert cpus.cgroup_paths(proc_cgroup)[""] == "/system.slice/x.service"
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "40 31 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert cpus.cgroup_mounts(mountinfo) == {
        "cpu": ("/docker/abc", "/sys/fs/cgroup/cpu,cpuacct"),
        "": ("/", "/sys/fs/cgroup/unified"),
    }


def test_walk_goes_from_our_cgroup_up_to_the_mount_point():
    walked = [str(p) for p in cpus._walk("/", "/sys/fs/cgroup/cpu", "/a/b")]
    assert walked == ["/sys/fs/cgroup/cpu/a/b", "/sys/fs/cgroup/cpu/a", "/sys/fs/cgroup/cpu"]
    # In a container the mount's root is our own cgroup: only it is read.
    assert [str(p) for p in cpus._walk("/docker/abc", "/sys/fs/cgroup/cpu", "/docker/abc")] == ["/sys/fs/cgroup/cpu"]


def test_worker_processes_joins_the_one_g_argument_nginx_reads():
    args = ["/usr/sbin/nginx", "-c", "/run/x/nginx.conf", "-g", "daemon off;"]
    assert with_worker_processes(args, "pid /run/x/nginx.pid;\n", 3) == [
        "/usr/sbin/nginx",
        "-c",
        "/run/x/nginx.conf",
        "-g",
        "daemon off; worker_processes 3;",
    ]
    assert with_worker_processes(["nginx", "-c", "c"], "", 2) == ["nginx", "-c", "c", "-g", "worker_processes 2;"]
    # A number in the config (NGINX_WORKER_PROCESSES=4) is left alone.
    assert with_worker_processes(args, "worker_processes 4;\n", 3) == args
