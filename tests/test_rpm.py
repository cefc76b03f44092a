"""`make rpm` builds packaging/rpm/slurm-spank-oci-image.spec; inspect the package it makes.

Needs rpmbuild (Debian: the `rpm` package, which `make deps` installs) and
Slurm's headers (libslurm-dev). Builds into a temporary _topdir in a few seconds.
"""
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAME = "slurm-spank-oci-image"

pytestmark = [
    pytest.mark.skipif(shutil.which("rpmbuild") is None,
                       reason="rpmbuild not installed (Debian: apt-get install rpm)"),
    pytest.mark.skipif(not Path("/usr/include/slurm/spank.h").exists(),
                       reason="Slurm headers not installed (Debian: libslurm-dev)"),
]


def _version():
    text = (ROOT / "daemon" / "ociimage" / "__init__.py").read_text()
    return re.search(r'^__version__ = "(.*)"$', text, re.M).group(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    top = tmp_path_factory.mktemp("rpm")
    r = subprocess.run(["make", "-s", "rpm", f"RPM_TOPDIR={top}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rpms = sorted((top / "RPMS").glob("*/*.rpm"))
    srpms = sorted((top / "SRPMS").glob("*.src.rpm"))
    assert len(rpms) == 1 and len(srpms) == 1, (rpms, srpms)
    root = top / "root"
    root.mkdir()
    archive = subprocess.run(["rpm2archive", "-"], stdin=rpms[0].open("rb"),
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        tf.extractall(root)
    return {"rpm": rpms[0], "srpm": srpms[0], "root": root, "top": top}


def q(rpm, *args):
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True,
                          check=True).stdout


def test_package_name_version_and_file_list(built):
    assert q(built["rpm"], "--qf", "%{NAME} %{VERSION}") == f"{NAME} {_version()}"
    files = set(q(built["rpm"], "-l").split())
    libdir = subprocess.run(["rpm", "--eval", "%{_libdir}"], capture_output=True, text=True,
                            check=True).stdout.strip()
    expected = {
        f"{libdir}/slurm/spank_oci_image.so",
        "/usr/bin/oci-image", "/usr/bin/oci-imaged",
        "/usr/libexec/oci-image/oci-image-step",
        "/usr/libexec/oci-image/oci-image-launch",   # next to the step client: the plugin's default
        "/usr/libexec/oci-image/oci-image-pyxis-importer",
        "/usr/share/oci-image/hooks/pmi",
        "/usr/share/oci-image/hooks/ocihook.py", "/etc/oci-image/hooks.d",
        "/usr/lib/systemd/system/oci-imaged.service",
        "/etc/oci-image/oci-image.conf",
        "/etc/slurm/plugstack.conf.d/oci-image.conf",
        "/var/lib/oci-image",
    }
    assert expected <= files, expected - files
    sitelib = [f for f in files if f.endswith("/site-packages/ociimage/step.py")]
    assert len(sitelib) == 1, sitelib
    base = sitelib[0][:-len("/ociimage/step.py")]
    for mod in ("cli.py", "daemon.py", "service.py", "v1/ociimage_pb2.py", "runtime/namespaces.py",
                "registry/client.py"):
        assert f"{base}/ociimage/{mod}" in files
    assert any(re.search(r"/ociimage/__pycache__/step\.cpython-\d+\.pyc$", f) for f in files)
    assert f"{base}/slurm_oci_image-{_version()}.dist-info/METADATA" in files
    # man pages (compressed or not, as the platform's brp-compress does)
    for page in ("man1/oci-image.1", "man8/oci-imaged.8", "man8/spank-oci-image.8"):
        assert any(re.fullmatch(rf"/usr/share/man/{page}(\.gz|\.bz2|\.xz|\.zst)?", f)
                   for f in files), page
    docs = [f for f in files if f.startswith("/usr/share/doc/")]
    for d in ("README.md", "docs/configuration.md", "docs/monolithic.md",
              "docs/migrating-from-pyxis.md", "bench/results/convert.svg"):
        if (ROOT / d).exists() or d.startswith("bench/"):
            assert any(f.endswith("/" + d) for f in docs), d
    # nothing from the build tree or the developer's checkout
    assert not any(re.search(r"(\.venv|egg-info|/tests/|\.o$|/build/)", f) for f in files)


def test_config_files_are_noreplace(built):
    assert sorted(q(built["rpm"], "--configfiles").split()) == [
        "/etc/oci-image/oci-image.conf", "/etc/slurm/plugstack.conf.d/oci-image.conf"]
    flags = q(built["rpm"], "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]")
    for line in flags.splitlines():
        if line.endswith(".conf") and line.split()[-1].startswith("/etc/"):
            assert "c" in line.split()[0] and "n" in line.split()[0], line  # %config(noreplace)


def test_plugstack_snippet_is_commented_out_and_points_into_the_package(built):
    root = built["root"]
    snippet = (root / "etc/slurm/plugstack.conf.d/oci-image.conf").read_text()
    lines = [ln for ln in snippet.splitlines() if ln.strip()]
    assert lines and all(ln.lstrip().startswith("#") for ln in lines), snippet
    line = [ln for ln in lines if "spank_oci_image.so" in ln]
    assert len(line) == 1, snippet
    words = line[0].lstrip("#").split()
    assert words[0] == "required"
    assert (root / words[1].lstrip("/")).is_file(), words[1]
    args = dict(w.split("=", 1) for w in words[2:])
    assert (root / args["step_client"].lstrip("/")).is_file()
    launcher = Path(args["step_client"]).parent / "oci-image-launch"
    assert (root / str(launcher).lstrip("/")).is_file()
    unit = (root / "usr/lib/systemd/system/oci-imaged.service").read_text()
    exe = re.search(r"^ExecStart=(\S+)", unit, re.M).group(1)
    assert (root / exe.lstrip("/")).is_file(), exe


def test_scriptlets_manage_the_unit_and_are_guarded(built):
    rpm = built["rpm"]
    assert "oci-imaged.service" in q(rpm, "--scripts")
    for tag, what in (("POSTIN", "post"), ("PREUN", "preun"), ("POSTUN", "postun")):
        body = q(rpm, "--qf", f"%{{{tag}}}")
        assert "oci-imaged.service" in body, (what, body)
        assert subprocess.run(["sh", "-n", "-c", body]).returncode == 0, (what, body)
        if not Path("/run/systemd/system").exists():
            # no systemd here: the scriptlets must be harmless no-ops (install 1, erase 0, upgrade 2)
            for arg in ("1", "0", "2"):
                r = subprocess.run(["sh", "-e", "-c", body, what, arg], capture_output=True, text=True)
                assert r.returncode == 0, (what, arg, r.stderr)


def test_requires(built):
    reqs = q(built["rpm"], "--requires")
    for dep in ("python3-grpcio", "python3-protobuf", "python3-requests", "python3-filelock",
                "python3-zstandard", "python3-prometheus_client", "squashfs-tools-ng",
                "util-linux"):
        assert re.search(rf"^{re.escape(dep)}\b", reqs, re.M), dep
    assert re.search(r"^python\(abi\) = 3\.\d+$", reqs, re.M)
    # the Slurm release the headers came from (a plugin of another release is refused)
    hdr = Path("/usr/include/slurm/slurm_version.h").read_text()
    v = int(re.search(r"#define\s+SLURM_VERSION_NUMBER\s+(0x[0-9a-fA-F]+)", hdr).group(1), 16)
    major, minor = v >> 16, (v >> 8) & 255
    assert f"(slurm >= {major}.{minor:02d} with slurm < {major}.{minor + 1:02d})" in reqs, reqs
    srpm_reqs = q(built["srpm"], "--requires")
    for dep in ("slurm-devel", "gcc", "glibc-static", "python3-setuptools"):
        assert re.search(rf"^{re.escape(dep)}\b", srpm_reqs, re.M), dep


def test_plugin_exports_only_spank_symbols(built):
    so = next(built["root"].glob("usr/lib*/slurm/spank_oci_image.so"))
    out = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True,
                         check=True).stdout
    syms = [ln.split()[-1] for ln in out.splitlines() if ln.strip()]
    assert "slurm_spank_init" in syms and "plugin_name" in syms
    bad = [s for s in syms if not re.fullmatch(r"slurm_spank_[a-z_]+|plugin_(name|type|version)", s)]
    assert not bad, bad


def test_plugin_is_built_with_the_projects_flags(built):
    """plugin/Makefile's own CFLAGS (-fPIC, -fstack-protector-strong, _FORTIFY_SOURCE) and
    LDFLAGS (-z now) must survive the spec's build command."""
    so = next(built["root"].glob("usr/lib*/slurm/spank_oci_image.so"))
    und = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True,
                         text=True, check=True).stdout
    assert "__stack_chk_fail" in und
    assert re.search(r"__\w+_chk\b", und.replace("__stack_chk_fail", "")), und
    dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True,
                         check=True).stdout
    assert "BIND_NOW" in dyn and "TEXTREL" not in dyn


def test_launcher_is_static(built):
    exe = built["root"] / "usr/libexec/oci-image/oci-image-launch"
    assert os.access(exe, os.X_OK)
    out = subprocess.run(["readelf", "-l", str(exe)], capture_output=True, text=True,
                         check=True).stdout
    assert "program interpreter" not in out  # runs inside any image, needs no ld.so there


def test_commands_run_from_the_package(built):
    root = built["root"]
    sitelib = next(root.glob("usr/lib/python3*/site-packages"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(sitelib), "LC_ALL": "C.UTF-8"}
    for cmd, args in (("usr/bin/oci-image", ["--version"]), ("usr/bin/oci-imaged", ["--version"]),
                      ("usr/libexec/oci-image/oci-image-step", ["--help"])):
        exe = root / cmd
        first = exe.read_text().splitlines()[0]
        assert first.startswith("#!/") and Path(first[2:].split()[0]).name.startswith("python3")
        # run with this test's interpreter: the package's python may be another path here
        r = subprocess.run([sys.executable, "-s", str(exe), *args], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        assert str(sitelib) in subprocess.run(
            [sys.executable, "-s", "-c", "import ociimage; print(ociimage.__file__)"], env=env,
            capture_output=True, text=True).stdout
        if args == ["--version"]:
            assert _version() in r.stdout


def test_source_rpm_carries_the_spec_and_the_working_tree(built):
    files = q(built["srpm"], "-l").split()
    assert f"{NAME}.spec" in files and f"{NAME}-{_version()}.tar.gz" in files
    tarball = built["top"] / "SOURCES" / f"{NAME}-{_version()}.tar.gz"
    with tarfile.open(tarball) as tf:
        names = set(tf.getnames())
    prefix = f"{NAME}-{_version()}/"
    assert all(n.startswith(prefix) for n in names)
    for f in ("plugin/dispatch.c", "plugin/contract_gen.h", "setup.cfg", "daemon/ociimage/step.py",
              "packaging/rpm/slurm-spank-oci-image.spec", "docs/man/oci-image.1"):
        assert prefix + f in names, f
    assert not any("/.git/" in n or "/.venv/" in n or n.endswith(".so") for n in names)
