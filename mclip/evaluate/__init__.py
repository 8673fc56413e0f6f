"""Stage 3, `mclip eval-retrieval`: retrieval per language with FAISS, beside the teacher used directly."""
