"""Apache Beam pipelines of tf-limaml: task building and offline meta embeddings."""
