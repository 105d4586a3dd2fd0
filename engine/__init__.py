"""engine: batched local inference on ONNX Runtime.

Knows nothing of agents or transports: must never import `gatewayd` or `protocols`.
"""
