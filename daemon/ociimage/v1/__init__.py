"""Generated gRPC stubs for the ociimage.v1 contract (see proto/); regenerate with `make proto`."""
