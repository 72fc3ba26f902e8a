"""scdino.export: checkpoints -> verified ONNX (preprocessing in the graph), int8 ONNX, TensorRT plans.

``scdino-export onnx|quantize|tensorrt``; library functions :func:`scdino.export.onnx_export.export_onnx`,
:func:`scdino.export.quantize.quantize`, :func:`scdino.export.tensorrt_build.build_engine`.
"""
