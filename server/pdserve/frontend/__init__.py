"""The front end: KServe v2 gRPC service, tensors, routing to engines."""
