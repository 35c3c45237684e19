"""The compression engine. Knows tensors and models; knows nothing of HTTP or the database.

`configs`, `shapes` and `errors` are light (no numpy/torch/onnx imports) because the API imports
them to validate a job before accepting it."""
