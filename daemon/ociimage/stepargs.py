"""The step client's arguments: its parser, built from ociimage.contract, and the checks of
the users' option values that submit and prepare both run.

The plugin passes every --oci-* value raw (as typed, or from its OCI_* variable); this
module is the only place that reads them. submit runs the same checks on the submit
host that prepare runs on every node, so a value a node would refuse is refused once,
at submit, with the same one-line message.

The parser is built from the contract at run time rather than generated into a file:
nothing can go stale, and the contract is plain data (cheap to import on every step).
"""

from __future__ import annotations

import argparse

from . import contract
from .errors import InvalidArgument, InvalidReference

#: the most a value may be (the plugin once cut at this too)
MAX_VALUE = 65536
_SQFS_SUFFIXES = (".sqfs", ".squashfs", ".sqsh")


def parse_bool(text, what: str = "value") -> bool:
    """The one spelling of booleans: 1/yes/true, 0/no/false (any case)."""
    t = str(text).strip().lower()
    if t in contract.TRUE_WORDS:
        return True
    if t in contract.FALSE_WORDS:
        return False
    raise InvalidArgument(f"{what}={text}: expected 1, yes, true, 0, no or false")


def _plain(value: str, what: str) -> str:
    if len(value) > MAX_VALUE or "\n" in value or "\r" in value or "\0" in value:
        raise InvalidArgument(f"{what}: invalid value (a line break, or longer than "
                              f"{MAX_VALUE} bytes)")
    return value


def _path_ok(p: str) -> bool:
    return p.startswith("/") and "\0" not in p and "\n" not in p and "/../" not in p + "/" \
        and "/./" not in p + "/"


def parse_mounts(text: str, what: str) -> list:
    """'ITEM,...' -> [mountflags.MountItem]: `SRC[:DST[:FLAGS]]` binds (absolute paths, no
    '..'; FLAGS '+'-joined as pyxis writes them) and `tmpfs:DST[:FLAGS]` (mountflags.py).

    An empty item (a trailing comma) is skipped; an empty field (`/a:`, `/a:/b:`) is an error.
    """
    from .mountflags import parse_list
    return parse_list(text, what)


def check_workdir(text: str, what: str = "--oci-workdir") -> str:
    _plain(text, what)
    if text and not _path_ok(text.rstrip("/") or "/"):
        raise InvalidArgument(f"{what}: {text!r} is not an absolute path without '.' or '..'")
    return text


#: --oci-name's flags we support (pyxis' names); "exec" (join a running container's
#: namespaces) is not: steps naming a container share its files, not its processes
NAME_FLAGS = ("auto", "create", "no_create")
_NAME_MAX = 64
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def parse_container_name(text: str, what: str = "--oci-name") -> tuple[str, str]:
    """'NAME[:FLAG]' -> (NAME, FLAG): NAME is 1-64 of [A-Za-z0-9._-], starting with a letter
    or digit (so never '.', '..' or a hidden name); it becomes one directory's name."""
    _plain(text, what)
    name, sep, flag = text.partition(":")
    shown = text[:80]
    if sep and flag not in NAME_FLAGS:
        if flag == "exec":
            raise InvalidArgument(f"{what}={shown}: the exec flag (joining a running "
                                  f"container) is not supported; give NAME alone: steps "
                                  f"naming it share its files")
        raise InvalidArgument(f"{what}={shown}: unknown flag {flag[:20]!r} "
                              f"(expected {', '.join(NAME_FLAGS)})")
    if not name or len(name) > _NAME_MAX or not set(name) <= _NAME_CHARS \
            or not name[0].isalnum():
        raise InvalidArgument(f"{what}={shown}: a container name is 1 to {_NAME_MAX} letters, "
                              f"digits, '.', '_' or '-', starting with a letter or digit")
    return name, flag or "auto"


def enroot_uri_to_reference(uri: str) -> str:
    """pyxis' --container-image: docker://[USER@][REGISTRY#]IMAGE[:TAG|@DIGEST] -> a reference.

    Without REGISTRY# the image is on Docker Hub (enroot's default), exactly as for a
    reference without a registry. USER@ names an enroot credentials entry; we use the
    user's docker/podman login instead, so it is dropped. An absolute path is a file.
    """
    text = uri.strip()
    if text.startswith("/"):
        return text
    if text.startswith("dockerd://") or text.startswith("podman://"):
        raise InvalidArgument(f"{uri}: images from a local Docker/Podman daemon are not "
                              f"supported; push the image to a registry")
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    elif "://" in text:
        raise InvalidArgument(f"{uri}: unsupported URI scheme (expected docker://)")
    if not text:
        raise InvalidArgument(f"{uri!r}: empty image reference")
    head, sep, rest = text.partition("#")
    if sep:
        if "@" in head:  # USER@REGISTRY#IMAGE
            head = head.rsplit("@", 1)[1]
        if not head or not rest:
            raise InvalidArgument(f"{uri}: expected [USER@][REGISTRY#]IMAGE[:TAG]")
        return f"{head}/{rest}"
    # no registry: a USER@ prefix can only be told apart from IMAGE@DIGEST by the digest
    if "@" in text and not text.split("@", 1)[1].startswith("sha256:"):
        text = text.split("@", 1)[1]
    return text


def check_image(image: str, what: str = "--oci-image", parse: bool = True) -> str:
    """The image's form (not whether it exists): a reference, or an absolute .sqfs path."""
    _plain(image, f"{what}={image[:200]}")
    if image.startswith("/"):
        if not image.endswith(_SQFS_SUFFIXES):
            raise InvalidArgument(f"{what}={image}: a local image must be a .sqfs "
                                  f"(or enroot .sqsh) file")
        if not _path_ok(image):
            raise InvalidArgument(f"{what}={image}: not an absolute path without '.' or '..'")
        return image
    if not parse:
        return image
    from .reference import parse_reference
    try:
        parse_reference(image)
    except InvalidReference as e:
        raise InvalidReference(f"{what}={image}: {e}") from None
    return image


def pinned_for(image: str, pinned: str) -> str | None:
    """OCI_IMAGE_PINNED when it pins this very image (a step of the job that pinned it)."""
    if not pinned or not image or image.startswith("/"):
        return None
    if pinned == image:
        return pinned
    base, at, digest = pinned.rpartition("@sha256:")
    return pinned if at and base == image else None


_BY_NAME = {o.name: o.code for o in contract.OPTIONS}
_BY_NAME.update({a.name: a.code for a in contract.ALIASES})
_FIELDS = {field for field, _value in contract.CODES.values()}


def option_values(pairs, env) -> dict:
    """The plugin's --option NAME VALUE pairs (as given), then each option's variable in env
    where its option was not given: {field: (raw value, how it was set)}."""
    out = {}
    for pair in pairs or ():
        name, _eq, value = pair.partition("=")
        code = _BY_NAME.get(name)
        if code is None:
            raise InvalidArgument(f"--{name}: not an option of this plugin")
        field, flag_value = contract.CODES[code]
        if flag_value is None and not value:
            raise InvalidArgument(f"--{name} needs a value")
        if flag_value is not None and value:
            raise InvalidArgument(f"--{name} takes no value")
        raw = flag_value if flag_value is not None else value
        if field in out and out[field][0] != raw:
            raise InvalidArgument(f"both {out[field][1]} and --{name} given")
        out[field] = (raw, f"--{name}")
    for o in contract.OPTIONS:
        field = contract.CODES[o.code][0]
        if not o.env or field in out or not env.get(o.env):
            continue
        if field == "image" and "container_image" in out:
            continue  # --container-image given: OCI_IMAGE does not override it
        out[field] = (env[o.env], o.env)
    return out


def resolve_options(args, env, parse_reference: bool = True) -> None:
    """Check the users' option values (submit and prepare) and set them on args.

    Flags come as raw values (OCI_WRITABLE=... as it is) and leave as bools.
    --container-image is translated from pyxis' form; OCI_IMAGE_PINNED of the job replaces
    a matching image by its pinned digest (args.inherited_pin).

    parse_reference=False (the step client): the reference's form is left to where it is
    resolved (submit: this host's daemon or the registry client; prepare: the node's
    daemon), which parse it with the same parser first; importing that parser here would
    cost every srun and step 16 ms.
    """
    values = option_values(args.option, env)
    for field in _FIELDS:
        raw, what = values.get(field, ("", field))
        if field in ("writable", "mount_home", "entrypoint", "batch_in_image", "remap_root"):
            default = field == "mount_home"
            setattr(args, field, parse_bool(raw, what) if raw != "" else default)
        else:
            setattr(args, field, raw)
    if args.container_image and not args.image:
        args.image = enroot_uri_to_reference(_plain(args.container_image, "--container-image"))
    if args.image:
        args.image = check_image(args.image.strip(), parse=parse_reference)
    if args.mounts:
        _plain(args.mounts, "--oci-mounts")
        parse_mounts(args.mounts, "--oci-mounts")
    if args.workdir:
        check_workdir(args.workdir)
    if args.env_names:
        _plain(args.env_names, "--oci-env")
    if args.container_name:
        name, flag = parse_container_name(args.container_name)
        if flag == "create" and not args.image:
            raise InvalidArgument(f"--oci-name={name}:create needs --oci-image: the image "
                                  f"the new container starts from")
        args.container_name = name if flag == "auto" else f"{name}:{flag}"
    if args.devices:
        parse_devices(args.devices)
    pinned = pinned_for(args.image, env.get("OCI_IMAGE_PINNED", ""))
    args.inherited_pin = pinned is not None  # the job pinned it already: nothing new to pin
    if pinned:
        args.image = check_image(pinned, "OCI_IMAGE_PINNED", parse=parse_reference)


def parse_devices(text: str, what: str = "--oci-devices") -> list[str]:
    """--oci-devices' qualified CDI names, in order, each once; the syntax only (which
    devices exist is each node's CDI specs' to say, in prepare)."""
    from .runtime.cdi import InvalidDeviceName, parse_qualified_name  # only when given
    out = []
    for name in (n.strip() for n in _plain(text, what).split(",")):
        if not name:
            continue
        try:
            parse_qualified_name(name)
        except InvalidDeviceName as e:
            raise InvalidArgument(f'{what}: "{name}" is not a qualified CDI device name '
                                  f'(vendor/class=name): {e.reason}') from None
        if name not in out:
            out.append(name)
    if not out:
        raise InvalidArgument(f"{what}: no device named (vendor/class=name,...)")
    return out


def join_pairs(argv: list[str]) -> list[str]:
    """The plugin's `--option NAME VALUE` as `--option=NAME=VALUE`: a VALUE a user chose may
    start with '-', which argparse would take for an option."""
    pairs = {a.flag for args in contract.STEP_COMMANDS.values() for a in args if a.kind == "pair"}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in pairs and i + 2 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}={argv[i + 2]}")
            i += 3
        else:
            out.append(argv[i])
            i += 1
    return out


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The step client's parser: exactly contract.STEP_COMMANDS."""
    p = argparse.ArgumentParser(prog="oci-image-step", description=description)
    sub = p.add_subparsers(dest="command")
    sub.required = True
    for name, arguments in contract.STEP_COMMANDS.items():
        sp = sub.add_parser(name)
        for a in arguments:
            kw = {"default": a.default}
            if a.required:
                kw["required"] = True
            if a.help:
                kw["help"] = a.help
            if a.choices:
                kw["choices"] = a.choices
            if a.kind == "flag":  # bare, or with a raw value: --writable / --writable no
                kw.update(nargs="?", const=True)  # the value: resolve_options
            elif a.kind == "store_true":
                kw["action"] = "store_true"
            elif a.kind == "append":
                kw.update(action="append", default=[])
            elif a.kind == "pair":  # NAME VALUE, joined by join_pairs() into NAME=VALUE
                kw.update(action="append", default=[], metavar="NAME=VALUE")
            elif a.kind in ("int", "float"):
                kw["type"] = int if a.kind == "int" else float
            sp.add_argument(a.flag, **kw)
    return p
