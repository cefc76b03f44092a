"""The config file: the shipped default parses, bad values are one clear error."""
from pathlib import Path

import pytest

from ociimage.config import Config, load_config, parse_size, prefetch_path
from ociimage.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_default_config_is_all_defaults():
    cfg = load_config(ROOT / "packaging" / "config" / "oci-image.conf")
    default = Config()
    for field in ("cache_dir", "quota", "lease_ttl", "socket", "runtime_dir", "metrics",
                  "log_level", "mount_idle", "compression", "level", "jobs",
                  "max_pulls_per_uid", "max_requests_per_uid", "stop_timeout",
                  "connect_timeout", "stall_timeout", "request_timeout", "min_rate",
                  "rate_window"):
        assert getattr(cfg, field) == getattr(default, field), field


def test_values(tmp_path):
    p = tmp_path / "c.conf"
    p.write_text("[cache]\ndir = /shared/oci\nquota = 1.5T\n[daemon]\nmetrics = 0.0.0.0:9464\n"
                 "node = n7\n[registries]\ninsecure = a:5000, b\n[squash]\nlevel = 9\n")
    cfg = load_config(p)
    assert cfg.cache_dir == Path("/shared/oci") and cfg.quota == int(1.5 * (1 << 40))
    assert cfg.metrics == ("0.0.0.0", 9464) and cfg.node == "n7"
    assert cfg.insecure_registries == ["a:5000", "b"] and cfg.level == 9


@pytest.mark.parametrize("text, needle", [
    ("[cache]\nquta = 1G\n", "unknown key 'quta'"),
    ("[cachee]\n", "unknown section [cachee]"),
    ("[cache]\nquota = lots\n", "not a size"),
    ("[cache]\ndir = relative/path\n", "absolute"),
    ("[squash]\ncompression = zip\n", "compression"),
    ("[squash]\nlevel = 40\n", "zstd levels are 1 to 22"),
    ("[daemon]\nmetrics = host:port\n", "HOST:PORT"),
    ("[daemon]\nlog_level = chatty\n", "log_level"),
    ("not ini at all", "c.conf"),
    ("[registries]\nmin_rate = fast\n", "min_rate"),
    ("[registries]\nrequest_timeout = 0\n", "request_timeout: must be at least"),
    ("[daemon]\nmax_pulls_per_uid = 0\n", "max_pulls_per_uid: must be at least 1"),
    ("[daemon]\nmax_pulls_per_uid = 8\nmax_requests_per_uid = 4\n", "max_requests_per_uid (4)"),
    ("[daemon]\ncdi_spec_dirs = /etc/cdi cdi\n", "cdi_spec_dirs: cdi must be an absolute path"),
    ("[daemon]\ngpu_cdi_kind = gpu\n", "gpu_cdi_kind: 'gpu' is not a CDI kind"),
    ("[daemon]\ngpu_cdi_kind = nvidia.com/gpu=0\n", "is not a CDI kind"),
])
def test_bad_values_are_clear_errors(tmp_path, text, needle):
    p = tmp_path / "c.conf"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_deadline_and_fairness_keys(tmp_path):
    p = tmp_path / "c.conf"
    p.write_text("[daemon]\nmax_pulls_per_uid = 2\nmax_requests_per_uid = 10\nstop_timeout = 3\n"
                 "[registries]\nconnect_timeout = 4\nstall_timeout = 8\nrequest_timeout = 20\n"
                 "min_rate = 1M\nrate_window = 15\n")
    cfg = load_config(p)
    assert (cfg.max_pulls_per_uid, cfg.max_requests_per_uid, cfg.stop_timeout) == (2, 10, 3.0)
    lim = cfg.net_limits()
    assert (lim.connect, lim.stall, lim.request, lim.min_rate, lim.rate_window) == \
        (4.0, 8.0, 20.0, 1 << 20, 15.0)
    assert lim.blob_deadline(10 << 20) == 30.0  # request_timeout + size at min_rate
    p.write_text("[registries]\nmin_rate = 0\n")
    assert load_config(p).net_limits().blob_deadline(1 << 40) == 60.0


def test_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.conf")


def test_parse_size():
    assert parse_size("500M", "x") == 500 << 20 and parse_size("2g", "x") == 2 << 30
    assert parse_size("1024", "x") == 1024


def test_prefetch_and_slurm_keys(tmp_path):
    p = tmp_path / "c.conf"
    p.write_text("[daemon]\nprefetch_socket = off\nprefetch_rate = 5\n"
                 "[slurm]\njobs = cli\nconf = /etc/slurm/x.conf\nrefresh = 2.5\n")
    cfg = load_config(p)
    assert prefetch_path(cfg) is None and cfg.prefetch_rate == 5
    assert cfg.slurm_jobs == "cli" and cfg.slurm_conf == "/etc/slurm/x.conf" and cfg.slurm_refresh == 2.5
    default = load_config(ROOT / "packaging" / "config" / "oci-image.conf")
    assert prefetch_path(default) == Path("/run/oci-image/oci-imaged-prefetch.sock")
    assert default.slurm_jobs == "auto"


@pytest.mark.parametrize("text, needle", [
    ("[slurm]\njobs = sometimes\n", "[slurm] jobs"),
    ("[daemon]\nprefetch_socket = rel.sock\n", "absolute"),
    ("[daemon]\nsocket = /run/x.sock\nprefetch_socket = /run/x.sock\n", "must differ"),
])
def test_bad_prefetch_and_slurm_values(tmp_path, text, needle):
    p = tmp_path / "c.conf"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(p)


def test_cdi_keys(tmp_path):
    assert (Config().cdi_spec_dirs, Config().gpu_cdi_kind) == (("/etc/cdi", "/var/run/cdi"), "")
    p = tmp_path / "c.conf"
    p.write_text("[daemon]\ncdi_spec_dirs = /a/cdi  /b/cdi\ngpu_cdi_kind = nvidia.com/gpu\n")
    cfg = load_config(p)
    assert (cfg.cdi_spec_dirs, cfg.gpu_cdi_kind) == (("/a/cdi", "/b/cdi"), "nvidia.com/gpu")
