"""runtime/cdiapply.py: which CDI devices a step gets and what its /dev must make.

The whole path (nodes made in the step's /dev, mounts, env, hooks, Slurm's gres GPUs)
runs on the real cluster in test_e2e_cdi.py; here the rules one at a time.
"""

import json
import os
import stat

import pytest

from ociimage.errors import InvalidArgument, NotFound
from ociimage.runtime import cdiapply


def test_gpus_from_the_steps_variable_first():
    env = {"SLURM_STEP_GPUS": "2,0", "SLURM_JOB_GPUS": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert cdiapply.gpu_devices(env, "nvidia.com/gpu") == ["nvidia.com/gpu=2", "nvidia.com/gpu=0"]


def test_gpus_of_the_job_for_the_batch_script_only():
    env = {"SLURM_JOB_GPUS": "1"}
    assert cdiapply.gpu_devices(env, "nvidia.com/gpu", batch=True) == ["nvidia.com/gpu=1"]
    # another step inherits the batch script's variable: not its allocation
    assert cdiapply.gpu_devices(env, "nvidia.com/gpu") == []


@pytest.mark.skipif(not os.path.ismount("/dev/shm"), reason="no /dev/shm mount on this host")
def test_a_node_inside_a_host_dev_submount_is_refused(tmp_path):
    dirs = _spec_dir(tmp_path, {"deviceNodes": [{"path": "/dev/shm/x", "type": "c",
                                                 "major": 1, "minor": 3}]})
    with pytest.raises(InvalidArgument, match="inside /dev/shm, a mount of the host's /dev"):
        cdiapply.resolve(["test.example/dev=a"], dirs, "n1")


def test_cuda_visible_devices_alone_is_not_an_allocation():
    # renumbered from 0 in a step's cgroup: not the node's indices
    assert cdiapply.gpu_devices({"CUDA_VISIBLE_DEVICES": "0"}, "nvidia.com/gpu") == []


def test_no_kind_no_gpus():
    assert cdiapply.gpu_devices({"SLURM_STEP_GPUS": "0"}, "") == []


def test_not_a_list_of_indices_maps_to_nothing():
    assert cdiapply.gpu_devices({"SLURM_STEP_GPUS": "N/A"}, "nvidia.com/gpu") == []


def test_requested_and_allocated_merge_once():
    names = cdiapply.step_device_names(["nvidia.com/gpu=0", "x.org/y=z"],
                                       {"SLURM_STEP_GPUS": "0,1"}, "nvidia.com/gpu")
    assert names == ["nvidia.com/gpu=0", "x.org/y=z", "nvidia.com/gpu=1"]


def _spec_dir(tmp_path, edits, kind="test.example/dev"):
    d = tmp_path / "cdi"
    d.mkdir(mode=0o755, exist_ok=True)
    (d / "t.json").write_text(json.dumps({"cdiVersion": "0.6.0", "kind": kind, "devices": [
        {"name": "a", "containerEdits": edits}]}))
    os.chmod(d / "t.json", 0o644)
    return [str(d)]


def test_a_node_the_host_dev_has_needs_nothing(tmp_path):
    dirs = _spec_dir(tmp_path, {"deviceNodes": [{"path": "/dev/null"}]})
    got = cdiapply.resolve(["test.example/dev=a"], dirs, "n1")
    assert got.make == () and [n.path for n in got.edits.device_nodes] == ["/dev/null"]


def test_a_missing_node_is_made_with_the_specs_numbers_and_mode(tmp_path):
    dirs = _spec_dir(tmp_path, {"deviceNodes": [
        {"path": "/dev/oci-test/z", "type": "c", "major": 1, "minor": 5, "fileMode": 0o640,
         "uid": 7, "gid": 8}]})
    [n] = cdiapply.resolve(["test.example/dev=a"], dirs, "n1").make
    assert n == cdiapply.NodeToMake("/dev/oci-test/z", stat.S_IFCHR | 0o640,
                                    os.makedev(1, 5), 7, 8)


def test_a_missing_node_takes_type_and_numbers_from_its_host_node(tmp_path):
    dirs = _spec_dir(tmp_path, {"deviceNodes": [{"path": "/dev/oci-test/n",
                                                 "hostPath": "/dev/null"}]})
    [n] = cdiapply.resolve(["test.example/dev=a"], dirs, "n1").make
    host = os.stat("/dev/null")
    assert (n.mode, n.rdev) == (host.st_mode, host.st_rdev)


def test_a_node_of_another_device_at_a_host_path_is_made_over_it(tmp_path):
    dirs = _spec_dir(tmp_path, {"deviceNodes": [{"path": "/dev/null", "type": "c",
                                                 "major": 1, "minor": 5}]})
    [n] = cdiapply.resolve(["test.example/dev=a"], dirs, "n1").make
    assert n.path == "/dev/null" and n.rdev == os.makedev(1, 5)


def test_a_node_outside_dev_is_refused(tmp_path):
    dirs = _spec_dir(tmp_path, {"deviceNodes": [{"path": "/opt/x", "type": "c",
                                                 "major": 1, "minor": 3}]})
    with pytest.raises(InvalidArgument, match="not below /dev"):
        cdiapply.resolve(["test.example/dev=a"], dirs, "n1")


def test_a_node_without_numbers_or_host_node_is_refused(tmp_path):
    dirs = _spec_dir(tmp_path, {"deviceNodes": [{"path": "/dev/oci-test/none"}]})
    with pytest.raises(NotFound, match="does not exist and the spec gives no type"):
        cdiapply.resolve(["test.example/dev=a"], dirs, "n1")


def test_unknown_device_names_node_and_dirs(tmp_path):
    dirs = _spec_dir(tmp_path, {"env": ["A=1"]})
    with pytest.raises(NotFound) as e:
        cdiapply.resolve(["test.example/dev=b"], dirs, "n7")
    assert "test.example/dev=b" in str(e.value) and "node n7" in str(e.value)
    assert dirs[0] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("edits, needle", [
    ({"hooks": [{"hookName": "poststop", "path": "/bin/true"}]}, "poststop hook"),
    ({"mounts": [{"hostPath": "tmpfs", "containerPath": "/x", "type": "tmpfs"}]},
     "only bind mounts"),
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "eth1"}]}, "netDevices"),
])
def test_what_oci_image_does_not_provide_is_refused(tmp_path, edits, needle):
    version = "1.1.0" if "netDevices" in edits else "0.6.0"
    d = tmp_path / "cdi"
    d.mkdir(mode=0o755)
    (d / "t.json").write_text(json.dumps({"cdiVersion": version, "kind": "test.example/dev",
                                          "devices": [{"name": "a", "containerEdits": edits}]}))
    with pytest.raises(InvalidArgument, match=needle):
        cdiapply.resolve(["test.example/dev=a"], [str(d)], "n1")


def test_submit_checks_the_syntax_only():
    from ociimage.stepargs import parse_devices
    assert parse_devices("nvidia.com/gpu=0, nvidia.com/gpu=0,x.org/y=all") == [
        "nvidia.com/gpu=0", "x.org/y=all"]
    with pytest.raises(InvalidArgument) as e:
        parse_devices("nvidia.com/gpu=0,foo")
    assert str(e.value).startswith('--oci-devices: "foo" is not a qualified CDI device name '
                                   '(vendor/class=name)')
    with pytest.raises(InvalidArgument, match="no device named"):
        parse_devices(" , ")
