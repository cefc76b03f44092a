#!/usr/bin/env python3
"""Generate the Python gRPC stubs from proto/ into daemon/ (or another directory).

Usage: protogen.py [OUTDIR]. Uses the distribution's protoc and gRPC Python
plugin (Debian: protobuf-compiler, protobuf-compiler-grpc), so the stubs are
the same on every machine of a release. The stubs are committed;
tests/test_proto.py regenerates them and fails when they differ.
"""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["ociimage/v1/ociimage.proto", "ociimage/v1/health.proto"]


def tools():
    protoc, plugin = shutil.which("protoc"), shutil.which("grpc_python_plugin")
    if not protoc or not plugin:
        raise SystemExit("protogen: needs protoc and grpc_python_plugin "
                         "(Debian: apt-get install protobuf-compiler protobuf-compiler-grpc)")
    return protoc, plugin


def generate(outdir: Path) -> None:
    protoc, plugin = tools()
    (outdir / "ociimage" / "v1").mkdir(parents=True, exist_ok=True)
    subprocess.run([protoc, f"-I{ROOT / 'proto'}", f"--python_out={outdir}",
                    f"--grpc_python_out={outdir}", f"--plugin=protoc-gen-grpc_python={plugin}",
                    *PROTOS], check=True)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "daemon")
