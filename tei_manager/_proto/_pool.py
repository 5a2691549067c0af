"""Private descriptor pool for the standard grpc.* files."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
