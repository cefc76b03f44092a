"""The committed man pages are exactly what scripts/manpages.py generates from the sources."""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "docs" / "man"
PAGES = ["oci-image.1", "oci-imaged.8", "spank-oci-image.8"]


def _manpages():
    spec = importlib.util.spec_from_file_location("manpages", ROOT / "scripts" / "manpages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_man_pages_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "manpages.py"), str(tmp_path)],
                   check=True, stdout=subprocess.DEVNULL)
    assert sorted(p.name for p in tmp_path.iterdir()) == PAGES
    assert sorted(p.name for p in MAN.iterdir()) == PAGES
    for name in PAGES:
        assert (MAN / name).read_text() == (tmp_path / name).read_text(), \
            f"docs/man/{name} is stale: run `make man` and commit the result"


def _help_options(argv):
    out = subprocess.run([sys.executable, "-c", "import sys; from {} import main; "
                          "sys.exit(main(sys.argv[1:]))".format(argv[0]), *argv[1:], "--help"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "daemon"),
                                                               "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    opts = set()
    for line in out.stdout.splitlines():  # option lines: "  -o FILE, --output FILE   help"
        m = re.match(r"^  (-\S.*?)(?:  |$)", line)
        if m:
            opts.update(re.findall(r"(?:^|, )(--?[a-z][a-z0-9-]*)", m.group(1)))
    return opts


def _man_text(name):
    return (MAN / name).read_text().replace("\\-", "-")


@pytest.mark.parametrize("module,page", [("ociimage.cli", "oci-image.1"),
                                         ("ociimage.daemon", "oci-imaged.8")])
def test_every_help_option_is_in_the_man_page(module, page):
    """Independent of the generator: what --help prints, the page documents."""
    text = _man_text(page)
    opts = _help_options([module])
    assert "--config" in opts
    for o in sorted(opts):
        assert f"\\fB{o}\\fR" in text, f"{o} from --help missing in {page}"


@pytest.mark.parametrize("command", ["convert", "pull", "ls", "inspect", "rm", "publish", "prune"])
def test_every_subcommand_option_is_in_the_man_page(command):
    text = _man_text("oci-image.1")
    assert f'.SS "{command}"' in text
    section = text.split(f'.SS "{command}"', 1)[1].split(".SS", 1)[0].split(".SH", 1)[0]
    for o in sorted(_help_options(["ociimage.cli", command])):
        assert f"\\fB{o}\\fR" in section, f"oci-image {command} {o} missing in its section"


def test_spank_page_has_every_option_and_plugstack_key():
    from ociimage import contract
    mp = _manpages()
    text = _man_text("spank-oci-image.8")
    options = mp.spank_options()
    names = {o["name"] for o in options}
    # what srun --help lists: every option registered by the plugin
    assert {"oci-image", "oci-mounts", "oci-workdir", "oci-writable", "oci-mount-home",
            "no-oci-mount-home", "oci-entrypoint", "oci-env", "oci-batch-in-image"} <= names
    for o in options:
        assert f"\\fB--{o['name']}" in text
        assert " ".join(o["usage"].split()).replace("\\", "\\e") in " ".join(text.split())
    keys = [k.name for k in contract.PLUGSTACK]
    assert {"step_client", "socket", "allow_sqfs", "default_mounts", "batch_in_image",
            "launcher", "prefetch_socket", "record_job", "pyxis_aliases"} <= set(keys)
    for k in keys:
        assert f"\\fB{k}=\\fR" in text.replace("\\-", "-")
    for o in contract.OPTIONS:
        if o.env:
            assert o.env in text


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", PAGES)
def test_man_page_renders_without_warnings(page):
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / page)],
                       capture_output=True, text=True, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
