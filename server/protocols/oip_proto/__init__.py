"""Open Inference Protocol v2 gRPC definitions: grpc_service.proto and the modules grpcio-tools generated from it."""
