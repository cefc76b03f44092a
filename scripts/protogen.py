#!/usr/bin/env python3
"""Generate the Python gRPC stubs from proto/ into daemon/ (or another directory).

Usage: protogen.py [OUTDIR]. The stubs are committed; tests/test_proto.py
regenerates them into a temporary directory and fails when they differ.
"""
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["ociimage/v1/ociimage.proto", "ociimage/v1/health.proto"]


def generate(outdir: Path) -> None:
    import grpc_tools
    include = Path(grpc_tools.__file__).parent / "_proto"
    (outdir / "ociimage" / "v1").mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
                          f"--python_out={outdir}", f"--grpc_python_out={outdir}", proto])
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "daemon")
