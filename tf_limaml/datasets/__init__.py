"""Dataset loaders: synthetic tasks (tests, demo) and MovieLens-100K."""
