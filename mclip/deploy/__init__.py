"""Using a trained student: `mclip encode` (texts to embeddings on disk) and `mclip export` (ONNX, int8)."""
