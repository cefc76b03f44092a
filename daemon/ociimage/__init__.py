"""slurm-oci-image: OCI images under Slurm, converted once per cluster into one SquashFS."""

__version__ = "0.1.0"
