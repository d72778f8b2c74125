"""fedbridge at the bedside: ONNX export with in-graph CAM and OOD score, runtimes, HTTP API.

Only ``export`` and ``quantize`` need torch or onnxruntime's quantization tools; predicting,
serving and benchmarking need numpy, Pillow, OpenCV, pydicom, onnx and onnxruntime (or TensorRT,
imported only by ``fedbridge_edge.trt``).
"""
