"""dsl-train: the thin trainer (see issue 7)."""
