"""The gRPC multiplexer: one endpoint routing every tei.v1 RPC to the managed instances."""
