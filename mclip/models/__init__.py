"""The encoders: the CLIP or sentence-transformers teacher, the student (backbone + pooler + projection), the torch-free
ONNX runtime, and what they share (length-sorted batches, the remote-code rule)."""
