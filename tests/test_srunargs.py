"""srun's own --multi-prog, told apart from the command's arguments (ociimage/srunargs.py)."""

import pytest

from ociimage.srunargs import asks_multi_prog, chdir_of


@pytest.mark.parametrize("argv", [
    ["srun", "--multi-prog", "conf"],
    ["srun", "-N2", "--oci-entrypoint", "--multi-prog", "conf"],
    ["srun", "-N", "2", "-l", "--multi", "conf"],           # getopt's abbreviation
    ["srun", "--oci-image", "img", "-lv", "--multi-prog", "conf"],
    ["srun", "--oci-image=img", "--container-entrypoint", "--label", "--multi-prog", "c"],
    ["srun", "-K1", "-n", "4", "--multi-prog=", "conf"],
])
def test_srun_option(argv):
    assert asks_multi_prog(argv) is True


@pytest.mark.parametrize("argv", [
    ["srun", "prog", "--multi-prog"],                      # the command's argument
    ["srun", "-N2", "--oci-entrypoint", "prog", "--multi-prog", "x"],
    ["srun", "-J", "--multi-prog", "prog"],                # the job's name
    ["srun", "--job-name", "--multi-prog", "prog"],
    ["srun", "--", "--multi-prog", "x"],
    ["srun", "-lN", "--multi-prog", "prog"],               # -N's value
    ["srun", "--mpi=pmix", "prog"],
    ["srun"],
])
def test_not_srun_option(argv):
    assert asks_multi_prog(argv) is False


@pytest.mark.parametrize("argv, want", [
    (["srun", "--chdir=/a", "pwd"], "/a"),
    (["srun", "-D", "/a", "-l", "pwd"], "/a"),
    (["srun", "-lD/a", "pwd"], "/a"),
    (["srun", "--chdir", "rel", "-D", "/b", "pwd"], "/b"),
    (["srun", "--ch=/c", "pwd"], "/c"),
    (["srun", "pwd", "--chdir=/a"], None),
    (["srun", "-J", "-D", "pwd"], None),
])
def test_chdir(argv, want):
    assert chdir_of(argv) == want
