"""Exports: an edit for another engine. :mod:`~actedit.export.hf` bakes it into a checkpoint's
biases, :mod:`~actedit.export.lmeval` writes lm-eval's ``steered`` file, :mod:`~actedit.export.gguf`
writes (and reads back) llama.cpp control vectors."""
