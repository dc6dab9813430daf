"""trt-bgswap: background replacement (RMBG mask -> LCM-LoRA SD inpainting -> composite) on ONNX Runtime and TensorRT."""

__version__ = "0.1.0"
