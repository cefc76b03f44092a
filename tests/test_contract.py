"""The contract (ociimage.contract, configkeys) is the one source: what is generated from it
is fresh, and what reads it agrees with it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ociimage import config, configkeys, contract, errors, plugstack, step, stepargs
from ociimage.errors import InvalidArgument
from stepclient import options, plugstack as plugstack_args

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["plugin/contract_gen.h", "plugin/options_gen.h", "README.md", "docs/configuration.md",
             "docs/man/oci-image.1", "docs/man/oci-imaged.8", "docs/man/spank-oci-image.8"]
PLUGIN_C = "\n".join(p.read_text() for p in sorted((ROOT / "plugin").glob("*.c"))
                     if p.name != "oci-image-launch.c")
CONTRACT_H = (ROOT / "plugin" / "contract_gen.h").read_text()
OPTIONS_H = (ROOT / "plugin" / "options_gen.h").read_text()
STEP_CLIENT = "/usr/libexec/oci-image/oci-image-step"


def c_list(name: str) -> list:
    """The strings of a generated `static const char *const NAME[] = { ..., NULL };`."""
    m = re.search(r"\b" + name + r"\[\] = \{ (.*?), NULL \};", CONTRACT_H)
    assert m, name
    return re.findall(r'"([^"]*)"', m.group(1))


def step_args(command: str, argv=(), *, plug=()):
    """The step client's arguments as main() parses them (the plugin's argv, joined)."""
    head = {"submit": ["submit"],
            "prepare": ["prepare", "--job", "1", "--step", "0", "--uid", "0", "--gid", "0"]}
    return stepargs.build_parser().parse_args(stepargs.join_pairs(
        head[command] + plugstack_args(f"step_client={STEP_CLIENT}", *plug) + list(argv)))


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
    monkeypatch.setattr(gen.contract, "CHECKED_VAR", "OCI_ELSEWHERE_CHECKED")
    assert '"OCI_ELSEWHERE_CHECKED"' in gen.contract_header()
    assert gen.contract_header() != CONTRACT_H
    first = gen.contract.OPTIONS[0]
    monkeypatch.setattr(gen.contract, "OPTIONS",
                        (first._replace(name="oci-elsewhere"),) + gen.contract.OPTIONS[1:])
    assert '{ "oci-elsewhere", ' in gen.options_header()
    assert gen.options_header() != OPTIONS_H


#: a valid value of every plugstack key
PLUGSTACK_EXAMPLES = {
    "step_client": STEP_CLIENT, "socket": "/s/d.sock", "launcher": "/l/launch",
    "allow_sqfs": "yes", "default_mounts": "/a:/b", "batch_in_image": "yes",
    "prefetch_socket": "/s/p.sock", "record_job": "no", "pyxis_aliases": "yes",
    "allow_remap_root": "no",
}


def test_the_plugin_handles_every_plugstack_key_and_no_other():
    names = [k.name for k in contract.PLUGSTACK]
    # the C: it checks every argument against the contract's keys ...
    assert c_list("oci_plugstack_keys") == names
    assert re.search(r"\*k = oci_plugstack_keys;", PLUGIN_C)
    # ... and reads four of them itself, by their generated names: what to run, which
    # names to register, whether a batch script is ours, where the job's marker is
    read = set(re.findall(r"plug_(?:arg|true)\(PS_([A-Z_]+)", PLUGIN_C))
    assert read == {"STEP_CLIENT", "PYXIS_ALIASES", "BATCH_IN_IMAGE", "SOCKET"}
    assert set(re.findall(r"#define PS_([A-Z_]+) ", CONTRACT_H)) == read
    assert 'plug_arg("' not in PLUGIN_C  # every key through the generated name
    assert '"/run/oci-image' not in PLUGIN_C  # the default socket: the contract's
    # the step client: it parses exactly these keys and refuses any other
    assert set(PLUGSTACK_EXAMPLES) == set(names)
    assert list(plugstack.Plugstack._fields) == names
    got = plugstack.parse([f"{k}={v}" for k, v in PLUGSTACK_EXAMPLES.items()])
    assert got == plugstack.Plugstack(
        step_client=STEP_CLIENT, socket="/s/d.sock", launcher="/l/launch", allow_sqfs=True,
        default_mounts="/a:/b", batch_in_image=True, prefetch_socket="/s/p.sock",
        record_job=False, pyxis_aliases=True, allow_remap_root=False)
    for bad in ("frobnicate=1", "Socket=/s", "step-client=/x", "pyxis=yes"):
        with pytest.raises(InvalidArgument, match="unknown argument"):
            plugstack.parse([f"step_client={STEP_CLIENT}", bad])


def test_the_plugin_reads_every_record_key():
    used = set(re.findall(r"strcmp\(key, REC_([A-Z_]+)\)", PLUGIN_C))
    assert used == {r.key.upper().replace("-", "_") for r in contract.RECORDS}
    for r in contract.RECORDS:
        assert f'#define REC_{r.key.upper().replace("-", "_")} "{r.key}"' in CONTRACT_H


def test_prepare_prints_only_contract_records():
    container = {"ns_path": "/ns", "cwd": "/w", "holder_pid": 5, "holder_start": "6",
                 "ns_inode": "7", "set_env": ["A=1"], "unset_env": ["B"],
                 "argv_prefix": ["/bin/sh"]}
    records = step._records(container, "/l/oci-image-launch")
    assert {k for k, _v in records} == {r.key for r in contract.RECORDS
                                        if r.command == "prepare"}
    assert ("cwd", "/w") in records and ("env", "A=1") in records
    assert ("unsetenv", "B") in records and ("launcher", "/l/oci-image-launch") in records


def test_the_option_values_the_plugin_passes_are_arguments_of_submit_and_prepare():
    # the C passes each option given as --option NAME VALUE, each plugstack argument as
    # --plugstack ARG, by the generated names
    assert "argv[ac++] = SC_ARG_OPTION, argv[ac++] = (char *)oci_options[i].name," in PLUGIN_C
    assert "argv[ac++] = SC_ARG_PLUGSTACK, argv[ac++] = plug_av[i];" in PLUGIN_C
    assert '"--option"' not in PLUGIN_C and '"--plugstack"' not in PLUGIN_C
    # every name the C can pass is an option of the contract that the step client knows
    c_names = re.findall(r'^\t\{ "([a-z-]+)", ', OPTIONS_H, re.M)
    codes = {o.name: o.code for o in contract.OPTIONS}
    codes.update({a.name: a.code for a in contract.ALIASES})
    assert c_names == [o.name for o in contract.OPTIONS] + [a.name for a in contract.ALIASES]
    for name in c_names:
        assert codes[name] in contract.CODES, name
    for cmd in ("submit", "prepare"):
        flags = {a.flag: a.kind for a in contract.STEP_COMMANDS[cmd]}
        assert flags["--option"] == "pair" and flags["--plugstack"] == "append", cmd
        args = step_args(cmd, options(oci_workdir="/w", oci_writable=""), plug=["socket=/s"])
        assert args.option == ["oci-workdir=/w", "oci-writable="], cmd
        assert args.plugstack == [f"step_client={STEP_CLIENT}", "socket=/s"], cmd


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
    # the plugstack arguments: the same words
    for w in contract.TRUE_WORDS + tuple(x.upper() for x in contract.TRUE_WORDS):
        assert plugstack.parse([f"step_client={STEP_CLIENT}", f"allow_sqfs={w}"]).allow_sqfs
    for w in contract.FALSE_WORDS + tuple(x.upper() for x in contract.FALSE_WORDS):
        assert plugstack.parse([f"step_client={STEP_CLIENT}",
                                f"record_job={w}"]).record_job is False
    for w in ("on", "off", "maybe"):
        with pytest.raises(InvalidArgument, match="expected yes or no"):
            plugstack.parse([f"step_client={STEP_CLIENT}", f"pyxis_aliases={w}"])
    # the C (pyxis_aliases): the generated words, no spelling of its own
    assert c_list("oci_true_words") == list(contract.TRUE_WORDS)
    assert re.search(r"\*w = oci_true_words;.*\n.*strcasecmp\(plug_arg\(key, \"\"\), \*w\)",
                     PLUGIN_C)
    assert "plug_true(PS_PYXIS_ALIASES)" in PLUGIN_C
    for w in contract.TRUE_WORDS[1:] + contract.FALSE_WORDS[1:]:
        assert f'"{w}"' not in PLUGIN_C, w


@pytest.mark.parametrize("value", ["/a:", "/a:/b:", "/a:/b:zz", "relative:/x", "/a:rel",
                                   "/tmp:/x/../../etc", "/a:/b:ro:x"])
def test_mount_grammar_refuses(value):
    with pytest.raises(InvalidArgument):
        stepargs.parse_mounts(value, "--oci-mounts")


def test_mount_grammar_accepts():
    assert [m[:3] for m in stepargs.parse_mounts("/a,/b:/c,/d:/e:ro,/f:/g:rw,", "x")] == [
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


BAD_OPTIONS = [  # (the plugin's --option arguments, the (job) environment)
    (options(oci_mounts="/a:"), {}),
    (options(oci_mounts="/a:/b:"), {}),
    (options(oci_workdir="rel"), {}),
    ([], {"OCI_WRITABLE": "maybe"}),
    (["--option", "oci-mount-home", "", "--option", "no-oci-mount-home", ""], {}),
    (options(oci_workdir="-x"), {}),
]


@pytest.mark.parametrize("command", ["submit", "prepare"])
def test_submit_refuses_what_prepare_refuses(command):
    """The same checks at both ends: a value submit lets through no node refuses for its form."""
    for bad, env in BAD_OPTIONS:
        args = step_args(command, options(oci_image="x/y:z") + bad)
        with pytest.raises(errors.OciImageError):
            stepargs.resolve_options(args, env)
    args = step_args(command, options(oci_image="a\nb"))
    with pytest.raises(InvalidArgument, match="oci-image"):
        stepargs.resolve_options(args, {})
    args = step_args(command, options(oci_image="x/y:z"), plug=["default_mounts=rel:/x"])
    stepargs.resolve_options(args, {})  # the options are fine ...
    with pytest.raises(InvalidArgument, match="default_mounts"):  # ... the plugstack is not
        plugstack.parse(args.plugstack)
    # the same arguments without the bad value pass
    args = step_args(command, options(oci_image="x/y:z", oci_mounts="/a:/b", oci_workdir="/w"))
    stepargs.resolve_options(args, {"OCI_WRITABLE": "yes"})
    assert (args.image, args.mounts, args.workdir, args.writable) == ("x/y:z", "/a:/b", "/w",
                                                                        True)


@pytest.mark.parametrize("command", ["submit", "prepare"])
def test_the_refusals_say_which_option(command):
    cases = [(options(oci_mounts="/a:"), {}, r"--oci-mounts: '/a:' is not SRC:DST\[:FLAGS\]"),
             (options(oci_workdir="rel"), {}, r"--oci-workdir: 'rel'"),
             (options(oci_workdir="-x"), {}, r"--oci-workdir: '-x' is not an absolute path"),
             ([], {"OCI_WRITABLE": "maybe"}, r"OCI_WRITABLE=maybe: expected 1, yes"),
             (["--option", "oci-mount-home", "", "--option", "no-oci-mount-home", ""], {},
              r"both --oci-mount-home and --no-oci-mount-home given")]
    for bad, env, message in cases:
        args = step_args(command, bad)  # a value starting with '-': no argparse error
        with pytest.raises(InvalidArgument, match=message) as e:
            stepargs.resolve_options(args, env)
        assert "\n" not in str(e.value)


def test_option_values_take_a_variable_only_where_the_option_was_not_given():
    args = step_args("submit", options(oci_workdir="/given", no_oci_mount_home=""))
    env = {"OCI_WORKDIR": "/env", "OCI_MOUNTS": "/m", "OCI_MOUNT_HOME": "1", "OCI_ENV": ""}
    assert stepargs.option_values(args.option, env) == {
        "workdir": ("/given", "--oci-workdir"), "mount_home": ("0", "--no-oci-mount-home"),
        "mounts": ("/m", "OCI_MOUNTS")}
    stepargs.resolve_options(args, env)
    assert (args.workdir, args.mount_home, args.mounts) == ("/given", False, "/m")
    # without the options, their variables
    args = step_args("submit")
    assert stepargs.option_values(args.option, env) == {
        "workdir": ("/env", "OCI_WORKDIR"), "mount_home": ("1", "OCI_MOUNT_HOME"),
        "mounts": ("/m", "OCI_MOUNTS")}


def test_oci_image_does_not_override_container_image():
    args = step_args("prepare", options(container_image="docker://reg.io#ns/img:1"))
    env = {"OCI_IMAGE": "other/image:2"}
    values = stepargs.option_values(args.option, env)
    assert values == {"container_image": ("docker://reg.io#ns/img:1", "--container-image")}
    stepargs.resolve_options(args, env)
    assert args.image == "reg.io/ns/img:1"
    args = step_args("prepare")  # nothing given: OCI_IMAGE is the image
    stepargs.resolve_options(args, env)
    assert args.image == "other/image:2"


def test_join_pairs_keeps_a_value_that_starts_with_a_dash():
    argv = ["submit", "--option", "oci-workdir", "-x", "--option", "oci-env", "--plugstack",
            "--option", "oci-writable", "", "--caller", "sbatch"]
    assert stepargs.join_pairs(argv) == ["submit", "--option=oci-workdir=-x",
                                         "--option=oci-env=--plugstack",
                                         "--option=oci-writable=", "--caller", "sbatch"]
    args = stepargs.build_parser().parse_args(stepargs.join_pairs(argv))
    assert args.option == ["oci-workdir=-x", "oci-env=--plugstack", "oci-writable="]
    assert args.plugstack == [] and args.caller == "sbatch"


def test_plugstack_defaults():
    got = plugstack.parse([f"step_client={STEP_CLIENT}"])
    assert got == plugstack.Plugstack(
        step_client=STEP_CLIENT, socket=contract.DEFAULT_SOCKET,
        launcher="/usr/libexec/oci-image/oci-image-launch", allow_sqfs=False,
        default_mounts="", batch_in_image=False,
        prefetch_socket=contract.DEFAULT_PREFETCH_SOCKET, record_job=True, pyxis_aliases=False,
        allow_remap_root=True)
    assert plugstack.parse(["step_client=/opt/x/step",
                            "launcher=/l/launch"]).launcher == "/l/launch"
    assert plugstack.parse([f"step_client={STEP_CLIENT}",
                            "prefetch_socket=none"]).prefetch_socket == ""


@pytest.mark.parametrize("argv,message", [
    ([], "step_client=PATH is required"),
    (["socket=/s"], "step_client=PATH is required"),
    (["step_client=oci-image-step"], "step_client=oci-image-step: must be an absolute path"),
    ([f"step_client={STEP_CLIENT}", "socket=run/d.sock"], "socket=run/d.sock: must be an absolute"),
    ([f"step_client={STEP_CLIENT}", "launcher=launch"], "launcher=launch: must be an absolute"),
    ([f"step_client={STEP_CLIENT}", "prefetch_socket=p.sock"],
     "prefetch_socket=p.sock: must be an absolute path or none"),
    ([f"step_client={STEP_CLIENT}", "allow_sqfs=maybe"], "allow_sqfs=maybe: expected yes or no"),
    ([f"step_client={STEP_CLIENT}", "record_job"], 'argument "record_job": expected key=value'),
    (["step_client"], 'argument "step_client": expected key=value'),
])
def test_plugstack_errors_are_one_line(argv, message):
    with pytest.raises(InvalidArgument) as e:
        plugstack.parse(argv)
    text = str(e.value)
    assert text.startswith("plugstack.conf: ") and message in text
    assert "\n" not in text


def test_a_record_with_a_nul_is_never_sent(tmp_path):
    """A value that holds a NUL would split into records of its own (an extra launcher or
    cwd) on the plugin's side: the step client refuses to send it."""
    import socket as _socket
    from types import SimpleNamespace
    ours, theirs = _socket.socketpair()
    try:
        with pytest.raises(ValueError, match="NUL"):
            step.send_records(SimpleNamespace(records_fd=theirs.fileno()),
                              [("env", "X=1\0launcher\0/dev/watchdog")])
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(1)  # nothing went out
    finally:
        ours.close()
        theirs.close()
