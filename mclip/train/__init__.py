"""Stage 2, `mclip train-student`: a multilingual student learns the cached teacher vectors from translated captions."""
