"""runtime/cdi.py: CDI spec loading, validation and device resolution."""

import copy
import json
import os
import sys

import pytest

from ociimage.runtime import cdi
from ociimage.runtime.cdi import (DeviceConflict, DeviceNode, Edits, Hook, InvalidDeviceName,
                                  Mount, Registry, SpecError, UnknownDevice, parse_qualified_name)


def spec_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


def write(d, name, content):
    p = d / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    os.chmod(p, 0o644)
    return p


GOOD = {
    "cdiVersion": "0.6.0",
    "kind": "vendor.com/gpu",
    "containerEdits": {
        "env": ["GPU_COMMON=1"],
        "deviceNodes": [{"path": "/dev/gpuctl", "type": "c", "major": 195, "minor": 255,
                         "permissions": "rw", "fileMode": 0o666, "uid": 0, "gid": 44}],
        "mounts": [{"hostPath": "/usr/lib/libgpu.so.1", "containerPath": "/usr/lib/libgpu.so.1",
                    "options": ["ro", "nosuid", "bind"]}],
        "hooks": [{"hookName": "createContainer", "path": "/usr/bin/gpu-hook",
                   "args": ["gpu-hook", "update-ldcache"], "env": ["X=y"], "timeout": 5}],
    },
    "devices": [
        {"name": "0", "containerEdits": {
            "env": ["GPU=0"],
            "deviceNodes": [{"path": "/dev/gpu0", "hostPath": "/dev/gpu0"}]}},
        {"name": "1", "containerEdits": {
            "env": ["GPU=1"],
            "deviceNodes": [{"path": "/dev/gpu1"}]}},
    ],
}

YAML = """\
cdiVersion: "0.5.0"
kind: example.org/fpga
devices:
  - name: card-a
    containerEdits:
      deviceNodes:
        - path: /dev/fpga0
          hostPath: /dev/fpga0
          type: c
      mounts:
        - hostPath: /opt/fpga/lib
          containerPath: /opt/fpga/lib
          options: [ro, rbind]
      hooks:
        - hookName: poststop
          path: /usr/libexec/fpga-reset
      env:
        - FPGA=card-a
"""


def one_error(reg):
    assert len(reg.errors) == 1, [str(e) for e in reg.errors]
    return reg.errors[0]


def broken(tmp_path, mutate, name="bad.json"):
    """Load GOOD changed by mutate() from one file: the SpecError it gives."""
    d = spec_dir(tmp_path, "etc")
    s = copy.deepcopy(GOOD)
    mutate(s)
    write(d, name, s)
    reg = Registry([str(d)])
    err = one_error(reg)
    assert isinstance(err, SpecError)
    assert err.path == str(d / name)
    assert str(d / name) in str(err) and "\n" not in str(err)
    assert reg.devices() == []
    return str(err)


# ------------------------------------------------------------ valid specs

def test_json_spec_resolves_spec_and_device_edits_in_order(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "gpu.json", GOOD)
    reg = Registry([str(d)])
    assert reg.errors == []
    assert reg.devices() == ["vendor.com/gpu=0", "vendor.com/gpu=1"]
    e = reg.resolve(["vendor.com/gpu=1", "vendor.com/gpu=0"])
    assert isinstance(e, Edits)
    assert e.env == ("GPU_COMMON=1", "GPU=1", "GPU=0")
    assert e.device_nodes == (
        DeviceNode(path="/dev/gpuctl", host_path="/dev/gpuctl", type="c", major=195, minor=255,
                   file_mode=0o666, permissions="rw", uid=0, gid=44),
        DeviceNode(path="/dev/gpu1", host_path="/dev/gpu1"),
        DeviceNode(path="/dev/gpu0", host_path="/dev/gpu0"),
    )
    assert e.mounts == (Mount("/usr/lib/libgpu.so.1", "/usr/lib/libgpu.so.1",
                              ("ro", "nosuid", "bind"), None),)
    assert e.hooks == (Hook("createContainer", "/usr/bin/gpu-hook",
                            ("gpu-hook", "update-ldcache"), ("X=y",), 5),)
    assert e.devices == ("vendor.com/gpu=1", "vendor.com/gpu=0")
    assert e.spec_files == (str(d / "gpu.json"),)


def test_spec_edits_applied_once_and_repeated_request_once(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "gpu.json", GOOD)
    e = Registry([str(d)]).resolve(["vendor.com/gpu=0", "vendor.com/gpu=0"])
    assert e.env == ("GPU_COMMON=1", "GPU=0")
    assert len(e.hooks) == 1


def test_yaml_spec(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "fpga.yaml", YAML)
    reg = Registry([str(d)])
    assert reg.errors == []
    e = reg.resolve(["example.org/fpga=card-a"])
    assert e.device_nodes == (DeviceNode("/dev/fpga0", "/dev/fpga0", "c"),)
    assert e.mounts == (Mount("/opt/fpga/lib", "/opt/fpga/lib", ("ro", "rbind")),)
    assert e.hooks == (Hook("poststop", "/usr/libexec/fpga-reset"),)
    assert e.env == ("FPGA=card-a",)


def test_yml_suffix_and_other_files_ignored(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "fpga.yml", YAML)
    write(d, "notes.txt", "not a spec")
    write(d, "gpu.json.bak", "{")
    (d / "sub.json").mkdir()
    reg = Registry([str(d)])
    assert reg.errors == []
    assert reg.devices() == ["example.org/fpga=card-a"]


def test_yaml_imported_only_for_yaml_files(tmp_path, monkeypatch):
    d = spec_dir(tmp_path, "etc")
    write(d, "gpu.json", GOOD)
    monkeypatch.setitem(sys.modules, "yaml", None)   # import yaml would fail
    assert Registry([str(d)]).devices() == ["vendor.com/gpu=0", "vendor.com/gpu=1"]


def test_default_dirs_order():
    assert cdi.DEFAULT_SPEC_DIRS == ("/etc/cdi", "/var/run/cdi")


def test_missing_dir_is_not_an_error(tmp_path):
    reg = Registry([str(tmp_path / "none")])
    assert reg.errors == [] and reg.devices() == []


# ------------------------------------------------------------ priority, conflicts

def test_later_dir_overrides_earlier(tmp_path):
    etc, run = spec_dir(tmp_path, "etc"), spec_dir(tmp_path, "run")
    write(etc, "gpu.json", GOOD)
    late = copy.deepcopy(GOOD)
    late["containerEdits"] = {"env": ["FROM=run"]}
    late["devices"] = [{"name": "0", "containerEdits": {"env": ["GPU=0-run"]}}]
    write(run, "gpu.json", late)
    reg = Registry([str(etc), str(run)])
    assert reg.errors == []
    assert reg.devices() == ["vendor.com/gpu=0", "vendor.com/gpu=1"]
    e = reg.resolve(["vendor.com/gpu=0"])
    assert e.env == ("FROM=run", "GPU=0-run")
    assert e.spec_files == (str(run / "gpu.json"),)
    # the device only the earlier directory defines still comes from there
    assert reg.resolve(["vendor.com/gpu=1"]).env == ("GPU_COMMON=1", "GPU=1")
    # and the other way round when the order of the directories is swapped
    assert Registry([str(run), str(etc)]).resolve(["vendor.com/gpu=0"]).env == (
        "GPU_COMMON=1", "GPU=0")


def test_same_device_twice_at_same_priority_is_a_conflict_when_requested(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "a.json", GOOD)
    other = copy.deepcopy(GOOD)
    other["devices"] = [GOOD["devices"][0]]
    write(d, "b.json", other)
    reg = Registry([str(d)])
    assert reg.errors == []
    with pytest.raises(DeviceConflict) as ei:
        reg.resolve(["vendor.com/gpu=0"])
    assert ei.value.paths == [str(d / "a.json"), str(d / "b.json")]
    assert str(d / "a.json") in str(ei.value) and str(d / "b.json") in str(ei.value)
    # the device only one file defines is fine
    assert reg.resolve(["vendor.com/gpu=1"]).env == ("GPU_COMMON=1", "GPU=1")


def test_higher_priority_settles_a_lower_priority_conflict(tmp_path):
    etc, run = spec_dir(tmp_path, "etc"), spec_dir(tmp_path, "run")
    write(etc, "a.json", GOOD)
    write(etc, "b.json", GOOD)
    late = copy.deepcopy(GOOD)
    late["devices"] = [{"name": "0", "containerEdits": {"env": ["GPU=run"]}}]
    write(run, "gpu.json", late)
    reg = Registry([str(etc), str(run)])
    assert reg.resolve(["vendor.com/gpu=0"]).env[-1] == "GPU=run"
    with pytest.raises(DeviceConflict):
        reg.resolve(["vendor.com/gpu=1"])


# ------------------------------------------------------------ errors on resolve

def test_unknown_device_lists_known_devices_of_the_kind(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "gpu.json", GOOD)
    write(d, "fpga.yaml", YAML)
    with pytest.raises(UnknownDevice) as ei:
        Registry([str(d)]).resolve(["vendor.com/gpu=7"])
    assert ei.value.known == ["vendor.com/gpu=0", "vendor.com/gpu=1"]
    assert "vendor.com/gpu=7" in str(ei.value)
    assert "vendor.com/gpu=0, vendor.com/gpu=1" in str(ei.value)
    assert "fpga" not in str(ei.value)


def test_unknown_kind_lists_known_kinds(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "gpu.json", GOOD)
    with pytest.raises(UnknownDevice) as ei:
        Registry([str(d)]).resolve(["other.com/nic=0"])
    assert ei.value.known == [] and ei.value.kinds == ["vendor.com/gpu"]
    assert "no spec defines kind other.com/nic" in str(ei.value)


def test_resolve_refuses_unqualified_name(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "gpu.json", GOOD)
    with pytest.raises(InvalidDeviceName):
        Registry([str(d)]).resolve(["gpu0"])


def test_broken_file_next_to_a_good_one(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "a-broken.json", '{"cdiVersion": "0.6.0", "kind": ')
    write(d, "b-broken.yaml", "kind: [unclosed\n")
    write(d, "gpu.json", GOOD)
    reg = Registry([str(d)])
    assert reg.devices() == ["vendor.com/gpu=0", "vendor.com/gpu=1"]
    assert [e.path for e in reg.errors] == [str(d / "a-broken.json"), str(d / "b-broken.yaml")]
    assert "invalid JSON" in str(reg.errors[0])
    assert "invalid YAML" in str(reg.errors[1])
    assert all("\n" not in str(e) for e in reg.errors)
    assert reg.resolve(["vendor.com/gpu=0"]).env == ("GPU_COMMON=1", "GPU=0")


# ------------------------------------------------------------ validation rules

def test_rule_cdiversion_required(tmp_path):
    assert "cdiVersion is required" in broken(tmp_path, lambda s: s.pop("cdiVersion"))


def test_rule_cdiversion_known(tmp_path):
    msg = broken(tmp_path, lambda s: s.update(cdiVersion="0.9.9"))
    assert "'0.9.9' is not a known CDI version" in msg


def test_rule_cdiversion_covers_the_fields_used(tmp_path):
    # hostPath in deviceNodes came with 0.5.0, annotations with 0.6.0
    msg = broken(tmp_path, lambda s: s.update(cdiVersion="0.4.0"))
    assert "cdiVersion 0.4.0 is too old" in msg and "need 0.5.0" in msg


def test_rule_kind_required(tmp_path):
    assert "kind is required" in broken(tmp_path, lambda s: s.pop("kind"))


@pytest.mark.parametrize("kind,rule", [
    ("vendor.com", "not of the form vendor/class"),
    ("vendor.com/", "not of the form vendor/class"),
    ("vendor.com/gpu/x", "invalid character '/' in class"),
    ("1vendor.com/gpu", "vendor '1vendor.com' must start with a letter"),
    ("vendor.com-/gpu", "must end with a letter or digit"),
    ("vendor.com/gpu_", "class 'gpu_' must end with a letter or digit"),
    ("ven dor.com/gpu", "invalid character ' ' in vendor"),
    ("vendor.com/" + "g" * 64, "longer than 63 characters"),
])
def test_rule_kind_characters(tmp_path, kind, rule):
    msg = broken(tmp_path, lambda s: s.update(kind=kind))
    assert rule in msg


def test_rule_unknown_top_level_field_refused(tmp_path):
    msg = broken(tmp_path, lambda s: s.update(containerRuntime=["docker"]))
    assert "unknown field 'containerRuntime' in the spec" in msg


def test_rule_unknown_field_in_device_node_refused(tmp_path):
    msg = broken(tmp_path, lambda s: s["devices"][0]["containerEdits"]["deviceNodes"][0]
                 .update(readonly=True))
    assert "unknown field 'readonly'" in msg


def test_rule_devices_required(tmp_path):
    assert "devices is required" in broken(tmp_path, lambda s: s.update(devices=[]))


@pytest.mark.parametrize("name,rule", [
    ("-gpu", "must start with a letter or digit"),
    ("gpu-", "must end with a letter or digit"),
    ("gp/u", "invalid character '/'"),
    ("gp=u", "invalid character '='"),
])
def test_rule_device_name_characters(tmp_path, name, rule):
    msg = broken(tmp_path, lambda s: s["devices"][0].update(name=name))
    assert rule in msg


def test_rule_device_defined_twice_in_a_spec(tmp_path):
    msg = broken(tmp_path, lambda s: s["devices"][1].update(name="0"))
    assert "device '0' is defined twice" in msg


def test_rule_device_edits_required_and_not_empty(tmp_path):
    assert "containerEdits is required" in broken(
        tmp_path, lambda s: s["devices"][0].pop("containerEdits"))


def test_rule_device_edits_not_empty(tmp_path):
    assert "empty container edits" in broken(
        tmp_path, lambda s: s["devices"][0].update(containerEdits={}))


def test_rule_env_name_value(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"].update(env=["=x"]))
    assert "'=x' is not NAME=VALUE" in msg


def test_rule_env_without_equals(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"].update(env=["JUSTNAME"]))
    assert "'JUSTNAME' is not NAME=VALUE" in msg


def test_rule_device_node_path_required(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["deviceNodes"][0].pop("path"))
    assert "deviceNodes[0].path is required" in msg


def test_rule_device_node_path_absolute(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["deviceNodes"][0].update(path="dev/x"))
    assert "deviceNodes[0].path must be an absolute path" in msg


def test_rule_device_node_host_path_absolute(tmp_path):
    msg = broken(tmp_path, lambda s: s["devices"][0]["containerEdits"]["deviceNodes"][0]
                 .update(hostPath="gpu0"))
    assert "hostPath must be an absolute path" in msg


def test_rule_device_node_type(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["deviceNodes"][0].update(type="x"))
    assert "type 'x' is not one of b/c/u/p" in msg


def test_rule_device_node_major_minor_not_negative(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["deviceNodes"][0].update(minor=-1))
    assert "minor -1 is out of range" in msg


def test_rule_device_node_major_integer(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["deviceNodes"][0].update(major="195"))
    assert "major must be an integer" in msg


def test_rule_device_node_file_mode(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["deviceNodes"][0]
                 .update(fileMode=0o20666))
    assert "fileMode" in msg and "out of range" in msg


def test_rule_device_node_permissions(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["deviceNodes"][0]
                 .update(permissions="rwx"))
    assert "permissions 'rwx' is not made of r, w, m" in msg


def test_rule_device_node_uid_gid_uint32(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["deviceNodes"][0].update(gid=2 ** 32))
    assert "gid 4294967296 is out of range" in msg


def test_rule_mount_host_path_required(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["mounts"][0].pop("hostPath"))
    assert "mounts[0].hostPath is required" in msg


def test_rule_mount_container_path_absolute(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["mounts"][0]
                 .update(containerPath="usr/lib"))
    assert "containerPath must be an absolute path" in msg


def test_rule_bind_mount_host_path_absolute(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["mounts"][0].update(hostPath="lib"))
    assert "mounts[0].hostPath must be an absolute path" in msg


def test_non_bind_mount_source_may_be_a_name(tmp_path):
    d = spec_dir(tmp_path, "etc")
    s = copy.deepcopy(GOOD)
    s["containerEdits"]["mounts"] = [{"hostPath": "tmpfs", "containerPath": "/run/gpu",
                                      "type": "tmpfs", "options": ["size=1m"]}]
    write(d, "gpu.json", s)
    e = Registry([str(d)]).resolve(["vendor.com/gpu=0"])
    assert e.mounts == (Mount("tmpfs", "/run/gpu", ("size=1m",), "tmpfs"),)


def test_rule_mount_options_list(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["mounts"][0].update(options="ro,bind"))
    assert "options must be a list of strings" in msg


def test_rule_hook_name(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["hooks"][0].update(hookName="prestop"))
    assert "hookName 'prestop' is not one of prestart, createRuntime" in msg


@pytest.mark.parametrize("name", cdi.HOOK_NAMES)
def test_every_hook_name_accepted(tmp_path, name):
    d = spec_dir(tmp_path, "etc")
    s = copy.deepcopy(GOOD)
    s["containerEdits"]["hooks"][0]["hookName"] = name
    write(d, "gpu.json", s)
    assert Registry([str(d)]).resolve(["vendor.com/gpu=0"]).hooks[0].hook_name == name


def test_rule_hook_path_absolute(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["hooks"][0].update(path="gpu-hook"))
    assert "hooks[0].path must be an absolute path" in msg


def test_rule_hook_args_strings(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["hooks"][0].update(args=["a", 1]))
    assert "hooks[0].args must be a list of strings" in msg


def test_rule_hook_env(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["hooks"][0].update(env=["NOVALUE"]))
    assert "hooks[0].env: 'NOVALUE' is not NAME=VALUE" in msg


def test_rule_hook_timeout_positive(tmp_path):
    msg = broken(tmp_path, lambda s: s["containerEdits"]["hooks"][0].update(timeout=0))
    assert "timeout 0 is out of range" in msg


def test_rule_spec_not_an_object(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "list.json", "[1, 2]")
    assert "the spec must be an object" in str(one_error(Registry([str(d)])))


# ------------------------------------------------------------ file safety

def test_refuses_file_not_owned_by_root(tmp_path):
    d = spec_dir(tmp_path, "etc")
    p = write(d, "gpu.json", GOOD)
    os.chown(p, 65534, 65534)
    reg = Registry([str(d)])
    err = one_error(reg)
    assert err.path == str(p) and "owned by uid 65534, not root" in str(err)
    assert reg.devices() == []


def test_refuses_file_writable_by_group_or_others(tmp_path):
    d = spec_dir(tmp_path, "etc")
    p = write(d, "gpu.json", GOOD)
    for mode in (0o664, 0o646):
        os.chmod(p, mode)
        err = one_error(Registry([str(d)]))
        assert err.path == str(p)
        assert "writable by group or others (mode %04o)" % mode in str(err)


def test_refuses_directory_writable_by_others(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "gpu.json", GOOD)
    os.chmod(d, 0o777)
    reg = Registry([str(d)])
    err = one_error(reg)
    assert err.path == str(d) and "the directory is writable" in str(err)
    assert reg.devices() == []


def test_refuses_symlink_leaving_the_directory(tmp_path):
    d = spec_dir(tmp_path, "etc")
    outside = write(tmp_path, "elsewhere.json", GOOD)
    (d / "gpu.json").symlink_to(outside)
    err = one_error(Registry([str(d)]))
    assert err.path == str(d / "gpu.json") and "leads out of" in str(err)


def test_symlink_within_the_directory_is_followed(tmp_path):
    d = spec_dir(tmp_path, "etc")
    write(d, "gpu-real.json", GOOD)
    (d / "gpu.json").symlink_to("gpu-real.json")
    reg = Registry([str(d)])
    assert reg.errors == []   # both names load the same devices: a conflict
    with pytest.raises(DeviceConflict):
        reg.resolve(["vendor.com/gpu=0"])


def test_refuses_fifo(tmp_path):
    d = spec_dir(tmp_path, "etc")
    os.mkfifo(d / "gpu.json", 0o644)
    err = one_error(Registry([str(d)]))
    assert "not a regular file" in str(err)


# ------------------------------------------------------------ qualified names

@pytest.mark.parametrize("name,parts", [
    ("vendor.com/class=name", ("vendor.com", "class", "name")),
    ("vendor1.com/class1=name1", ("vendor1.com", "class1", "name1")),
    ("vendor-1.com/class-1=name-1", ("vendor-1.com", "class-1", "name-1")),
    ("vendor.com/class.1=0", ("vendor.com", "class.1", "0")),
    ("vendor_1.com/class_1=name_1", ("vendor_1.com", "class_1", "name_1")),
    ("nvidia.com/gpu=GPU-1a2b:3", ("nvidia.com", "gpu", "GPU-1a2b:3")),
    ("nvidia.com/gpu=all", ("nvidia.com", "gpu", "all")),
    ("a/b=c", ("a", "b", "c")),
])
def test_qualified_name_accepted(name, parts):
    assert parse_qualified_name(name) == parts
    assert cdi.is_qualified_name(name)


@pytest.mark.parametrize("name", [
    "",
    "name",
    "/dev/nvidia0",
    "vendor.com/class",
    "vendor.com/class=",
    "=name",
    "vendor.com=name",
    "/class=name",
    "vendor.com/=name",
    "1vendor.com/class=name",
    "vendor.com/1class=name",
    "vendor.com-/class=name",
    "vendor.com/class_=name",
    "vendor.com/cl/ass=name",
    "vendor.com/class=-name",
    "vendor.com/class=name-",
    "vendor.com/class=na/me",
    "vendor.com/class=na=me",
    "vendor.com/class=na me",
    "vendor.com/class=näme",
])
def test_qualified_name_refused(name):
    with pytest.raises(InvalidDeviceName) as ei:
        parse_qualified_name(name)
    assert ei.value.name == name
    assert not cdi.is_qualified_name(name)
