"""Ways to run the engine: in-process simulation, gRPC deployment."""
