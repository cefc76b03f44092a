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


def test_stubs_match_the_proto_services():
    """A changed .proto (e.g. a new RPC) must show up in the stubs the daemon serves."""
    from ociimage.v1 import ociimage_pb2
    services = {s.name: [m.name for m in s.methods]
                for s in ociimage_pb2.DESCRIPTOR.services_by_name.values()}
    assert services == {"Images": ["Pull", "Resolve", "Inspect", "List", "Remove", "Prune"],
                        "Containers": ["PrepareStep", "ReleaseStep", "ReleaseJob"]}
