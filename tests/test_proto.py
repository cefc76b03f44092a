"""The committed gRPC stubs are exactly what the .proto generates."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "protogen.py"), str(tmp_path)], check=True)
    generated = sorted(p.name for p in (tmp_path / "ociimage" / "v1").glob("*.py"))
    assert generated == ["health_pb2.py", "health_pb2_grpc.py", "ociimage_pb2.py", "ociimage_pb2_grpc.py"]
    for name in generated:
        committed = ROOT / "daemon" / "ociimage" / "v1" / name
        assert committed.read_bytes() == (tmp_path / "ociimage" / "v1" / name).read_bytes(), \
            f"{committed} is stale: run `make proto` and commit the result"
