"""How a task's environment is made from the job's and the image's.

Rules (documented in the README):
- Tasks start from the job's environment, as Slurm gives it.
- The image's Env wins over the job's, so the software in the image finds
  what its builder set (PATH in particular comes from the image).
- Except: Slurm's own variables and those of the MPI/PMI wire-up always pass
  through from the job, and so do the names the user lists in --oci-env.
- An image without PATH gets Docker's default PATH.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Tuple

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASS_THROUGH_PREFIXES = ("SLURM_", "SLURMD_", "SPANK_", "PMI_", "PMIX_", "OMPI_", "MPI_",
                         "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES",
                         "OCI_IMAGE")


def parse_env_list(items: Iterable[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if sep and name and "\0" not in item:
            out[name] = value
    return out


def passes_through(name: str, host_wins: Iterable[str]) -> bool:
    return name in host_wins or name.startswith(PASS_THROUGH_PREFIXES)


def merge(image_env: Iterable[str], job_env: Mapping[str, str],
          host_wins: Iterable[str] = ()) -> Tuple[Dict[str, str], List[str]]:
    """(variables to set over the job's environment, variables to unset)."""
    wins = set(host_wins)
    image = parse_env_list(image_env)
    image.setdefault("PATH", DEFAULT_PATH)
    to_set = {k: v for k, v in image.items()
              if not passes_through(k, wins) and job_env.get(k) != v}
    return to_set, []
