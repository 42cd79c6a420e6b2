"""Label Studio ML backend serving EVF-SAM text-prompted brush masks (HTTP server, RQ workers, embedded mode)."""
