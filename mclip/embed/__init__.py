"""Stage 1, `mclip embed-teacher`: the teacher runs once over the English captions into the teacher cache."""
