"""The contract (ociimage.contract, configkeys) is the one source: what is generated from it
is fresh, and what reads it agrees with it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ociimage import config, configkeys, contract, errors, step, stepargs
from ociimage.errors import InvalidArgument

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["plugin/contract_gen.h", "plugin/options_gen.h", "README.md", "docs/configuration.md",
             "docs/man/oci-image.1", "docs/man/oci-imaged.8", "docs/man/spank-oci-image.8"]
PLUGIN_C = "\n".join(p.read_text() for p in sorted((ROOT / "plugin").glob("*.c"))
                     if p.name != "oci-image-launch.c")


def test_generated_files_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gencontract.py"), str(tmp_path)],
                   check=True, stdout=subprocess.DEVNULL)
    for rel in GENERATED:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), \
            f"{rel} is stale: run `make contract` and commit the result"


def test_a_changed_contract_makes_the_files_stale(tmp_path, monkeypatch):
    """The freshness check sees a change in the contract (not only in the files)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gencontract",
                                                  ROOT / "scripts" / "gencontract.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen.contract, "DEFAULT_SOCKET", "/elsewhere.sock")
    assert "/elsewhere.sock" in gen.contract_header()
    assert gen.contract_header() != (ROOT / "plugin" / "contract_gen.h").read_text()


def test_the_plugin_handles_every_plugstack_key_and_no_other():
    used = set(re.findall(r"KEY\(PS_([A-Z_]+)\)", PLUGIN_C))
    assert used == {k.name.upper() for k in contract.PLUGSTACK}
    assert 'KEY("' not in PLUGIN_C  # every key through the generated name
    assert '"/run/oci-image' not in PLUGIN_C  # the default sockets come from the contract


def test_the_plugin_reads_every_record_key():
    used = set(re.findall(r"strcmp\(key, REC_([A-Z_]+)\)", PLUGIN_C))
    assert used == {r.key.upper() for r in contract.PREPARE_RECORDS}


def test_prepare_prints_only_contract_records():
    class C:
        ns_path, cwd, holder_pid, holder_start, ns_inode = "/ns", "/w", 5, 6, 7
        set_env, unset_env, argv_prefix = ["A=1"], ["B"], ["/bin/sh"]
    fields = step._records(C()).split(b"\0")[:-1]
    keys = {k.decode() for k in fields[0::2]}
    assert keys == {r.key for r in contract.PREPARE_RECORDS}


def test_the_option_values_the_plugin_passes_are_arguments_of_submit_and_prepare():
    passed = set(re.findall(r"OPTARG\(SC_PREPARE_([A-Z_]+),", PLUGIN_C))
    assert {"IMAGE", "CONTAINER_IMAGE", "MOUNTS", "WORKDIR", "WRITABLE", "MOUNT_HOME",
            "ENTRYPOINT", "ENV_NAMES"} == passed
    for cmd in ("submit", "prepare"):
        flags = {a.flag[2:].replace("-", "_").upper() for a in contract.STEP_COMMANDS[cmd]}
        assert passed <= flags, cmd


def test_the_step_client_parser_is_the_contract():
    p = stepargs.build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) == set(contract.STEP_COMMANDS)
    for name, args in contract.STEP_COMMANDS.items():
        flags = {s for a in sub.choices[name]._actions for s in a.option_strings} - {"-h", "--help"}
        assert flags == {a.flag for a in args}, name


def test_every_exit_code_is_in_the_contract():
    codes = {e.code for e in contract.EXIT_CODES}
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.OciImageError)]
    assert {c.exit_code for c in classes} <= codes
    assert 3 in {c.exit_code for c in classes}  # DaemonUnavailable: documented now
    readme = (ROOT / "README.md").read_text()
    for e in contract.EXIT_CODES:
        assert f"| {e.code} | {e.meaning} |" in readme


def test_config_accepts_exactly_the_declared_keys(tmp_path):
    for k in configkeys.CONFIG_KEYS:
        assert k.name in config._KNOWN[k.section]
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for key in ("prefetch_socket", "prefetch_rate", "trusted_squashfs", "publish_to"):
        assert f"| `{key}` |" in doc
    assert "## [slurm]" in doc and "| `refresh` |" in doc
    bad = tmp_path / "c.conf"
    bad.write_text("[daemon]\nfrobnicate = 1\n")
    with pytest.raises(errors.ConfigError, match="frobnicate"):
        config.load_config(bad)


def test_readme_plugstack_table_has_every_key():
    readme = (ROOT / "README.md").read_text()
    for k in contract.PLUGSTACK:
        assert f"| `{k.name}=" in readme, k.name


def test_one_spelling_of_booleans():
    for w in contract.TRUE_WORDS + tuple(x.upper() for x in contract.TRUE_WORDS):
        assert stepargs.parse_bool(w) is True
    for w in contract.FALSE_WORDS:
        assert stepargs.parse_bool(w) is False
    for w in ("on", "off", "maybe", ""):
        with pytest.raises(InvalidArgument):
            stepargs.parse_bool(w)
    header = (ROOT / "plugin" / "contract_gen.h").read_text()
    assert 'oci_true_words[] = { "1", "yes", "true", NULL }' in header
    assert "word_in(val, oci_true_words)" in PLUGIN_C


@pytest.mark.parametrize("value", ["/a:", "/a:/b:", "/a:/b:zz", "relative:/x", "/a:rel",
                                   "/tmp:/x/../../etc", "/a:/b:ro:x"])
def test_mount_grammar_refuses(value):
    with pytest.raises(InvalidArgument):
        stepargs.parse_mounts(value, "--oci-mounts")


def test_mount_grammar_accepts():
    assert stepargs.parse_mounts("/a,/b:/c,/d:/e:ro,/f:/g:rw,", "x") == [
        ("/a", "/a", False), ("/b", "/c", False), ("/d", "/e", True), ("/f", "/g", False)]


@pytest.mark.parametrize("uri,ref", [
    ("docker://user@reg.io#ns/img:1", "reg.io/ns/img:1"),
    ("user@reg.io#ns/img:1", "reg.io/ns/img:1"),
    ("user@ubuntu:24.04", "ubuntu:24.04"),   # the C translator kept USER@ here
    ("ubuntu@sha256:" + "a" * 64, "ubuntu@sha256:" + "a" * 64),
    ("reg.io#img", "reg.io/img"),
    ("/x/img.sqfs", "/x/img.sqfs"),
])
def test_one_enroot_translator(uri, ref):
    assert stepargs.enroot_uri_to_reference(uri) == ref


def test_submit_refuses_what_prepare_refuses():
    """The same checks at both ends: a value submit lets through no node refuses for its form."""
    for bad in (["--mounts", "/a:"], ["--mounts", "/a:/b:"], ["--workdir", "rel"],
                ["--writable", "maybe"], ["--image", "a\nb"], ["--default-mounts", "rel:/x"]):
        sa = stepargs.build_parser().parse_args(["submit"] + bad)
        pa = stepargs.build_parser().parse_args(
            ["prepare", "--job", "1", "--step", "0", "--uid", "0", "--gid", "0",
             "--image", "x/y:z"] + bad if bad[0] != "--image" else
            ["prepare", "--job", "1", "--step", "0", "--uid", "0", "--gid", "0"] + bad)
        for args in (sa, pa):
            with pytest.raises(errors.OciImageError):
                stepargs.resolve_options(args)
