#!/usr/bin/env bash
# Regenerate skyfed's gRPC modules from skyfed.proto (needs grpcio-tools; the runtime does not).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DIR=src/skyfed/runtime/grpc
"$PY" -m grpc_tools.protoc -I "$DIR" --python_out="$DIR" --grpc_python_out="$DIR" "$DIR/skyfed.proto"
# protoc writes `import skyfed_pb2`; make it a package-relative import.
sed -i 's/^import skyfed_pb2 as skyfed__pb2$/from . import skyfed_pb2 as skyfed__pb2/' "$DIR/skyfed_pb2_grpc.py"
echo "generated $DIR/skyfed_pb2.py $DIR/skyfed_pb2_grpc.py"
